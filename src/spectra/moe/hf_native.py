"""Saved MoE models that are Hugging Face models: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads them, without spectra installed (issue 19).

The standard way Hugging Face ships an architecture it does not have: `config.json` names, in
`auto_map`, a config class and a model class in Python files saved beside the weights, and
transformers imports them when the user passes `trust_remote_code=True`. `write_hf_native` writes,
into a directory `save_pretrained` has filled:

    configuration_spectra_moe.py   SpectraMoEConfig: the base model's config class, model_type
                                   'spectra_moe'
    modeling_spectra_moe.py        SpectraMoEForCausalLM: the base model's causal-LM class, whose
                                   __init__ builds the base model and then the MoE blocks from the
                                   config's `spectra_moe` record (moe/rebuild.py), the way
                                   `load_moe_model` does
    spectra_*.py                   a copy of the spectra modules that rebuilding and the MoE
                                   forward need (the MoE block, experts, routing context, every
                                   router), one flat file per module
    config.json                    model_type 'spectra_moe', architectures, auto_map, and
                                   `spectra_base_model_type` (the base family, for load_moe_model)

Why 'spectra_moe' and not the base model_type: transformers knows 'llama', so a plain
`from_pretrained(dir)` would build a dense Llama, report the experts as unexpected keys and run on
freshly initialised MLPs. It knows no 'spectra_moe': without `trust_remote_code` it raises, asking
for it. The loaded model is strict as well: a missing, unexpected or mis-shaped key raises
(transformers would only warn).

Why the spectra modules are copied by hand, with their imports rewritten: transformers' loader
copies the file named in `auto_map` and, recursively, the files it imports *relatively*
(`from .x import y`) from the same directory (flat: no sub-packages); every absolute import must
be installed. So `spectra.routing.base` becomes `spectra_routing_base.py` and `from
spectra.routing.base import X` becomes `from .spectra_routing_base import X`. The copies are the
modules themselves (one implementation), except in three places, each checked here so a change in
the sources fails the save loudly instead of writing a checkpoint that does not load:
- `spectra.config` also holds the Hydra/OmegaConf side of the configuration (composition,
  validation of a whole run). Its copy keeps only the definitions the other copies import (and
  what those use), found from the syntax tree; the router groups and the schemas of the
  `spectra_moe` record are plain dataclasses.
- An `omegaconf` import is wrapped in try/except with stand-ins: loading a model never calls it
  (moe/rebuild.py hands the groups over as dicts) and the loader need not have it installed.
- `spectra.routing` registers its routers by importing every module of its directory; its copy
  imports them by name.

The base classes must be transformers' own (`transformers.models.*`): the files import them from
the transformers the loader has installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

from torch import nn

import spectra
import spectra.moe.rebuild  # noqa: F401  (the code the saved files copy: imported, so snapshot below)

# Model type and class names written into config.json.
MODEL_TYPE = "spectra_moe"
CONFIG_FILE = "configuration_spectra_moe.py"
MODELING_FILE = "modeling_spectra_moe.py"
CONFIG_CLASS = "SpectraMoEConfig"
MODEL_CLASS = "SpectraMoEForCausalLM"
BASE_MODEL_TYPE_KEY = "spectra_base_model_type"

# The spectra modules the saved code needs, with everything they import: rebuilding (which
# imports upcycling, router replacement, the MoE block, experts and routing context) and the
# routing package (which imports, and so registers, every router).
BUNDLE_ROOTS = ("spectra.moe.rebuild", "spectra.routing")
# Modules copied in part: only the definitions the other copies import (see the module docstring).
SLICED = frozenset({"spectra.config"})
# The third-party packages the saved code may import: what loading a transformers model needs anyway.
ALLOWED_PACKAGES = frozenset({"torch", "transformers"})
# Imported but optional: wrapped in try/except with stand-ins (see the module docstring).
OPTIONAL_PACKAGES = frozenset({"omegaconf"})


class HFNativeError(RuntimeError):
    """The MoE model cannot be written as a Hugging Face model (a base class not in transformers,
    or spectra code the saved files could not import)."""


def flat_name(module: str) -> str:
    """The saved file (without .py) of a spectra module: spectra.routing.base -> spectra_routing_base."""
    return module.replace(".", "_")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# module -> its source text when it was imported (near enough: see `snapshot_sources`).
_SOURCES: dict[str, str] = {}


def snapshot_sources() -> None:
    """Keep the source text of every spectra module imported so far (the first time each is seen).

    The saved files must be the code the model was built and trained with, which is the code
    Python imported, not what the files hold when the model is saved hours later (a researcher
    may edit a router during a run). This module imports what it copies and takes the snapshot
    when it is imported; a save takes one too, for modules imported since.
    """
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if _root(name) == "spectra" and name not in _SOURCES and file and file.endswith(".py"):
            _SOURCES[name] = Path(file).read_text()


def _source(module: str) -> str:
    if module not in _SOURCES:
        _SOURCES[module] = _source_path(module).read_text()
    return _SOURCES[module]


def _source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise HFNativeError(f"{module}: source not found")
    return Path(spec.origin)


def _is_package(module: str) -> bool:
    return _source_path(module).name == "__init__.py"


def _imports(tree: ast.Module):
    """Every import statement of `tree`, at any depth (imports inside functions count too)."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def _spectra_targets(node: ast.ImportFrom) -> list[tuple[str, list[ast.alias]]]:
    """The spectra modules a `from spectra... import` statement reads, each with its names: a
    name that is itself a module (`from spectra import routing`) is that module."""
    out: dict[str, list[ast.alias]] = {}
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        target = sub if _is_module(sub) else node.module
        out.setdefault(target, []).append(alias)
    return list(out.items())


def _root(name: str) -> str:
    return name.split(".")[0]


def _check_third_party(module: str, tree: ast.Module) -> None:
    for node in _imports(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise HFNativeError(f"{module}: relative import `from {'.' * node.level}{node.module or ''}`; use absolute spectra imports")
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        for name in names:
            top = _root(name)
            if top == "spectra" and isinstance(node, ast.Import):
                raise HFNativeError(f"{module}: `import {name}`; the copy supports `from spectra.x import y` only")
            if top not in ALLOWED_PACKAGES | OPTIONAL_PACKAGES | {"spectra", "__future__"} and top not in sys.stdlib_module_names:
                raise HFNativeError(f"{module}: imports {top!r}, which a model's loader need not have installed")


# ----------------------------------------------------------------------------- slicing


def _bound_names(node: ast.stmt) -> list[str]:
    """The module-level names a top-level statement defines."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in node.names]
    return []


def _assigned_attribute_owner(node: ast.stmt) -> str | None:
    """X for a top-level `X.attr = ...` or `X[key] = ...` (it changes X, so it goes where X goes)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
    if len(targets) != 1 or not isinstance(targets[0], (ast.Attribute, ast.Subscript)):
        return None
    target = targets[0]
    while isinstance(target, (ast.Attribute, ast.Subscript)):
        target = target.value
    return target.id if isinstance(target, ast.Name) else None


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _first_line(node: ast.stmt, lines: list[str]) -> int:
    """1-based first line of a statement, with its decorators and the comment lines right above it."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while first > 1 and lines[first - 2].lstrip().startswith("#"):
        first -= 1
    return first


def slice_module(module: str, source: str, wanted: set[str]) -> str:
    """`source` reduced to the top-level definitions named in `wanted` and everything they use
    (found from the syntax tree), in their original order, with the imports they need. Any other
    top-level statement (code that runs at import) raises: a slice would silently drop it."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    body = list(tree.body)
    docstring = None
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        docstring = body.pop(0)
    defined: dict[str, ast.stmt] = {}
    attached: dict[str, list[ast.stmt]] = {}  # `X.attr = ...` after X's definition: kept with X
    for node in body:
        names = _bound_names(node)
        owner = _assigned_attribute_owner(node)
        if owner is not None:
            attached.setdefault(owner, []).append(node)
        elif not names and not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            raise HFNativeError(f"{module}: line {node.lineno} is top-level code a slice cannot keep")
        for name in names:
            defined[name] = node
    missing = wanted - defined.keys()
    if missing:
        raise HFNativeError(f"{module}: has no top-level {sorted(missing)}")
    keep: set[int] = set()
    todo = sorted(wanted)
    while todo:
        node = defined.get(todo.pop())
        if node is None or id(node) in keep:
            continue
        for part in [node] + [a for name in _bound_names(node) for a in attached.get(name, [])]:
            keep.add(id(part))
            if not isinstance(part, (ast.Import, ast.ImportFrom)):
                todo.extend(_used_names(part))
    out = "" if docstring is None else "".join(lines[docstring.lineno - 1 : docstring.end_lineno]) + "\n"
    previous_import = False
    for node in body:
        if id(node) in keep or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            out += "" if is_import and previous_import else "\n\n" if not is_import else "\n"
            out += "".join(lines[_first_line(node, lines) - 1 : node.end_lineno])
            previous_import = is_import
    return out


# ----------------------------------------------------------------------------- import rewriting


def _alias(a: ast.alias) -> str:
    return f"{a.name} as {a.asname}" if a.asname else a.name


def _rewritten(node: ast.stmt, indent: str) -> list[str] | None:
    """The lines replacing one import statement in a copy, or None to keep it as it is."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and _root(node.module) == "spectra":
        out = []
        for target, aliases in _spectra_targets(node):
            if target == f"{node.module}.{aliases[0].name}":  # `from spectra import routing`
                out += [f"{indent}from . import {flat_name(target)} as {a.asname or a.name}" for a in aliases]
            else:
                out.append(f"{indent}from .{flat_name(target)} import {', '.join(map(_alias, aliases))}")
        return out
    if isinstance(node, ast.ImportFrom) and node.level == 0 and _root(node.module) in OPTIONAL_PACKAGES:
        names = [a.asname or a.name for a in node.names]
        return [
            f"{indent}try:  # optional when loading a model (spectra.moe.hf_native): stand-ins below",
            f"{indent}    from {node.module} import {', '.join(map(_alias, node.names))}",
            f"{indent}except ImportError:",
            f"{indent}    {' = '.join(names)} = type({node.module + ' not installed'!r}, (), {{}})",
        ]
    return None


def rewrite_imports(source: str) -> str:
    """`source` with its spectra imports pointing at the flat copies and its optional imports guarded."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in sorted(_imports(tree), key=lambda n: n.lineno, reverse=True):
        indent = lines[node.lineno - 1][: node.col_offset]
        new = _rewritten(node, indent)
        if new is not None:
            lines[node.lineno - 1 : node.end_lineno] = [line + "\n" for line in new]
    return "".join(lines)


def _package_source(module: str, source: str) -> str:
    """A package's `__init__` whose loop over `pkgutil.iter_modules(__path__)` imports every
    module of the package (so that they register themselves): the same imports, by name."""
    tree = ast.parse(source)
    loops = [n for n in tree.body if isinstance(n, ast.For) and "iter_modules" in ast.unparse(n.iter)]
    if len(loops) != 1:
        raise HFNativeError(f"{module}: expected one `for ... in pkgutil.iter_modules(__path__)` loop, found {len(loops)}")
    loop = loops[0]
    # The modules the package imported (it imports them all when it is imported).
    subs = sorted(name.rpartition(".")[2] for name in _SOURCES if name.rpartition(".")[0] == module)
    lines = source.splitlines(keepends=True)
    lines[loop.lineno - 1 : loop.end_lineno] = [
        f"from {module}.{sub} import __name__ as _{sub}  # noqa: F401  (importing it registers its routers)\n"
        for sub in subs
    ]
    return "".join(lines)


# ----------------------------------------------------------------------------- the bundle


def _module_text(module: str, wanted: set[str] | None) -> str:
    """A module's source as copied, before its imports are rewritten."""
    source = _source(module)
    if module in SLICED:
        source = slice_module(module, source, wanted or set())
    if _is_package(module):
        source = _package_source(module, source)
    return source


def bundle_sources(roots: tuple[str, ...] = BUNDLE_ROOTS) -> dict[str, str]:
    """file name -> text of the copied spectra modules: `roots` and every spectra module they
    import (at any depth, imports inside functions included), to a fixed point (a slice imports
    less than its module)."""
    wanted: dict[str, set[str]] = {m: set() for m in SLICED}
    while True:
        texts: dict[str, str] = {}
        needs: dict[str, set[str]] = {m: set() for m in SLICED}
        queue = list(roots)
        while queue:
            module = queue.pop()
            if module in texts:
                continue
            text = _module_text(module, wanted.get(module))
            tree = ast.parse(text)
            _check_third_party(module, tree)
            texts[module] = text
            for node in _imports(tree):
                if isinstance(node, ast.ImportFrom) and _root(node.module or "") == "spectra":
                    for target, aliases in _spectra_targets(node):
                        queue.append(target)
                        if target in SLICED:
                            needs[target] |= {a.name for a in aliases}
        if needs == wanted:
            break
        wanted = needs
    return {f"{flat_name(m)}.py": _header(m) + rewrite_imports(text) for m, text in sorted(texts.items())}


def _header(module: str) -> str:
    how = "the definitions the other copies use" if module in SLICED else "copied"
    return (
        f"# {module} (spectra {spectra.__version__}), {how}, imports rewritten to this directory's files.\n"
        f"# Written by spectra.moe.hf_native when the model was saved; see its docstring.\n"
    )


def _transformers_class(cls: type, what: str) -> type:
    """The first class of `cls`'s MRO that transformers defines (the model itself, or the base
    class of a model loaded from this saved code)."""
    for base in cls.__mro__:
        if base.__module__.startswith("transformers.models."):
            return base
    raise HFNativeError(f"{what} {cls.__module__}.{cls.__name__} is not a transformers class; "
                        "the saved model code can only build on transformers' own architectures")


CONFIG_TEMPLATE = '''\
# Written by spectra.moe.hf_native (spectra {version}): see modeling_spectra_moe.py.
"""SpectraMoEConfig: {base_module}.{base} under its own model_type, so that only the saved
modeling code (trust_remote_code=True) builds the model; the MoE is described by `spectra_moe`."""

from {base_module} import {base}


class SpectraMoEConfig({base}):
    model_type = "{model_type}"
    base_model_type = {base}.model_type
'''

MODELING_TEMPLATE = '''\
# Written by spectra.moe.hf_native (spectra {version}) when the model was saved.
"""SpectraMoEForCausalLM: a {base} whose MLPs (or MoE gates) spectra replaced by MoE blocks.

`AutoModelForCausalLM.from_pretrained(<this directory>, trust_remote_code=True)` builds the
{base}, rebuilds the MoE blocks from the config's `spectra_moe` record with the copied spectra
code (spectra_*.py; spectra need not be installed) and loads the weights, strictly. Generation
works as for the base model; SPECTRA's recurrent routing state follows the KV cache.
"""

from {base_module} import {base}

from .configuration_spectra_moe import SpectraMoEConfig
from .spectra_moe_rebuild import realign_cpu_tensors, rebuild_moe, restore_unsaved_buffers
from .spectra_routing import ROUTERS  # noqa: F401  (imports, and so registers, every router)


class SpectraMoEForCausalLM({base}):
    config_class = SpectraMoEConfig

    def __init__(self, config):
        super().__init__(config)
        # Router replacement checks the MoE family by `config.model_type`: during the rebuild the
        # config names the family it describes ('spectra_moe' is the checkpoint's type on disk).
        config.model_type = config.base_model_type
        try:
            rebuild_moe(self, config.spectra_moe)
        finally:
            del config.model_type

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for `@use_experts_implementation` in the source of the class's module:
        # the experts are the base model's, so ask the base class (router replacement sets it).
        return {base}._can_set_experts_implementation()

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        """transformers' from_pretrained, strict: a missing, unexpected or mis-shaped weight raises
        instead of leaving a freshly initialised tensor in the model."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {{k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}}
        if problems:
            raise ValueError(f"the saved weights do not match {{cls.__name__}}: {{problems}}")
        restore_unsaved_buffers(model)  # built on the meta device: see there
        realign_cpu_tensors(model)  # bit-equal to the model as trained: see there
        return (model, info) if output_loading_info else model
'''


def write_hf_native(model: nn.Module, path: str | os.PathLike) -> None:
    """Make the `save_pretrained` directory `path` of the MoE model `model` a Hugging Face model
    (see the module docstring): write the modeling code and point config.json at it."""
    root = Path(path)
    snapshot_sources()
    base_config = _transformers_class(type(model.config), "config class")
    base_model = _transformers_class(type(model), "model class")
    version = spectra.__version__
    files = dict(bundle_sources())
    files[CONFIG_FILE] = CONFIG_TEMPLATE.format(version=version, base_module=base_config.__module__,
                                                base=base_config.__name__, model_type=MODEL_TYPE)
    files[MODELING_FILE] = MODELING_TEMPLATE.format(version=version, base_module=base_model.__module__, base=base_model.__name__)
    for name, text in files.items():
        (root / name).write_text(text)
    config_file = root / "config.json"
    config = json.loads(config_file.read_text())
    config.update({
        "model_type": MODEL_TYPE,
        BASE_MODEL_TYPE_KEY: base_config.model_type,
        "architectures": [MODEL_CLASS],
        "auto_map": {"AutoConfig": f"{Path(CONFIG_FILE).stem}.{CONFIG_CLASS}",
                     "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{MODEL_CLASS}"},
    })
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    check_loadable(root, set(files))


def check_loadable(root: Path, written: set[str]) -> None:
    """What transformers' loader will do with the saved code, checked now: every copied file is
    reached through relative imports from the modeling file (else it is not copied into the
    module cache), each relative import names a file that is there, and no file imports a package
    outside torch, transformers and the standard library (try/except imports excepted)."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files, get_relative_imports

    reached = {Path(f).name for f in get_relative_import_files(str(root / MODELING_FILE))} | {MODELING_FILE}
    unreached = written - reached
    if unreached:
        raise HFNativeError(f"{root}: {sorted(unreached)} would not be copied by transformers' loader")
    for name in sorted(written):
        dangling = [m for m in get_relative_imports(str(root / name)) if not (root / f"{m}.py").is_file()]
        extra = set(get_imports(str(root / name))) - ALLOWED_PACKAGES - set(sys.stdlib_module_names)
        if dangling or extra:
            raise HFNativeError(f"{root / name}: relative imports {dangling} without a file, packages {sorted(extra)} required")


snapshot_sources()  # see there: the modules this one copies are imported by now
