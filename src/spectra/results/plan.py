"""results/plan.yaml -> the list of cells `make results` trains.

A plan has `common` overrides (every cell), `seeds`, `bases` (dense models to upcycle from:
name -> train.py overrides) and `families`; a family is a grid:

    common + family.fixed + one value of every family.axes entry + seed=<s> for s in seeds

An axis value is `key=value` (the axis name is the config key), or, when it already holds `=`,
one or more overrides separated by spaces that vary together (Sweep E's length and batch size).
Every problem is reported with the plan file and the key that holds it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spectra.config import cell_dirname

PLAN_KEYS = ("common", "seeds", "bases", "families")
FAMILY_KEYS = ("base", "fixed", "axes", "seeds", "snapshots")


class PlanError(ValueError):
    """A results plan that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One training run of the plan: `train.py *overrides hydra.run.dir=<root>/<family>/<name>`."""

    family: str
    name: str
    overrides: tuple[str, ...]  # common + fixed + axis values + seed, in that order
    base: str | None  # the bases entry it upcycles from (None: trains from its own config)
    snapshots: bool  # commit the routing snapshots too (figures read them)

    def run_dir(self, root: str | Path) -> Path:
        """Where this cell's run directory lives under the results root (results/runs)."""
        return Path(root) / self.family / self.name


@dataclass
class Plan:
    """A parsed plan: bases by name and the expanded cells, in plan order."""

    path: Path
    bases: dict[str, tuple[str, ...]]
    cells: list[Cell] = field(default_factory=list)

    def family_names(self) -> list[str]:
        """Families in plan order."""
        return list(dict.fromkeys(c.family for c in self.cells))


def _fail(path: Path, key: str, why: str) -> None:
    raise PlanError(f"{path}: {key}: {why}")


def _strings(path: Path, key: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        _fail(path, key, f"must be a list of 'key=value' overrides, got {value!r}")
    return tuple(value)


def _seeds(path: Path, key: str, value) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        _fail(path, key, f"must be a non-empty list of integers, got {value!r}")
    return list(value)


def _axis_values(path: Path, key: str, axis: str, values) -> list[tuple[str, ...]]:
    """Each value of one axis as the overrides it stands for."""
    if not isinstance(values, list) or not values:
        _fail(path, key, f"must be a non-empty list of values, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, (dict, list)) or v is None:
            _fail(path, key, f"values must be scalars or 'k=v k2=v2' strings, got {v!r}")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        out.append(tuple(text.split()) if "=" in text else (f"{axis}={text}",))
    return out


def _family_cells(path: Path, name: str, fam: dict, common: tuple[str, ...], seeds: list[int], bases: dict) -> list[Cell]:
    where = f"families.{name}"
    if not isinstance(fam, dict):
        _fail(path, where, f"must be a mapping, got {fam!r}")
    unknown = sorted(set(fam) - set(FAMILY_KEYS))
    if unknown:
        _fail(path, f"{where}.{unknown[0]}", f"unknown key; a family has {', '.join(FAMILY_KEYS)}")
    base = fam.get("base")
    if base is not None and base not in bases:
        _fail(path, f"{where}.base", f"{base!r} is not one of bases: {sorted(bases)}")
    fixed = _strings(path, f"{where}.fixed", fam.get("fixed"))
    fam_seeds = _seeds(path, f"{where}.seeds", fam["seeds"]) if "seeds" in fam else seeds
    axes = fam.get("axes") or {}
    if not isinstance(axes, dict):
        _fail(path, f"{where}.axes", f"must map an axis name to its values, got {axes!r}")
    grids = [_axis_values(path, f"{where}.axes.{a}", a, vs) for a, vs in axes.items()]
    swept = {o.split("=", 1)[0].lstrip("+~") for grid in grids for value in grid for o in value} | {"seed"}
    cells = []
    for point in itertools.product(*grids):
        varying = tuple(o for value in point for o in value)
        for seed in fam_seeds:
            cell_overrides = (*varying, f"seed={seed}")
            dirname = cell_dirname(list(cell_overrides), {k: None for k in swept})
            cells.append(Cell(name, dirname, (*common, *fixed, *cell_overrides), base, bool(fam.get("snapshots", False))))
    return cells


def load_plan(path: str | Path) -> Plan:
    """Read and expand a results plan; raises PlanError naming the file and key on bad input."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such results plan")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        _fail(path, "<top>", "must be a mapping with keys " + ", ".join(PLAN_KEYS))
    unknown = sorted(set(raw) - set(PLAN_KEYS))
    if unknown:
        _fail(path, unknown[0], f"unknown key; a plan has {', '.join(PLAN_KEYS)}")
    common = _strings(path, "common", raw.get("common"))
    seeds = _seeds(path, "seeds", raw.get("seeds", [0]))
    bases_raw = raw.get("bases") or {}
    if not isinstance(bases_raw, dict):
        _fail(path, "bases", f"must map a base name to its train.py overrides, got {bases_raw!r}")
    bases = {name: _strings(path, f"bases.{name}", ovs) for name, ovs in bases_raw.items()}
    families = raw.get("families")
    if not isinstance(families, dict) or not families:
        _fail(path, "families", "must map family names to their grids")
    plan = Plan(path, bases)
    for name, fam in families.items():
        plan.cells += _family_cells(path, name, fam, common, seeds, bases)
    seen: dict[Path, Cell] = {}
    for c in plan.cells:
        other = seen.setdefault(Path(c.family, c.name), c)
        if other is not c:
            _fail(path, f"families.{c.family}", f"two cells share the directory {c.name!r}: {other.overrides} and {c.overrides}")
    return plan
