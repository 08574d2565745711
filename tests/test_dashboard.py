"""An Optuna study written the way `hydra/sweeper=spectra_optuna` writes it (issue #19, part 3)
opens in optuna-dashboard: its server, started on a local port against the sweep's storage,
serves the study's trials over its JSON API exactly as Optuna's own reader sees them.

    optuna-dashboard sqlite:///$PWD/outputs/search/rw/optuna.db     # then open http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from spectra.sweep import study_hygiene as hygiene

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sweep_storage(sweep_dir: Path):
    """The sweeper's default storage (hydra.sweeper.storage=null): <sweep dir>/optuna.db."""
    return hygiene.open_storage(None, sweep_dir)


def _write_studies(sweep_dir: Path) -> None:
    """Two studies like the sweeper's: a single-objective search (completed trials, a crashed one
    carrying the sweeper's error attribute, one still running) and a two-objective one."""
    storage = _sweep_storage(sweep_dir)
    search = optuna.create_study(study_name="search_osr-0123abcd", storage=storage, direction="minimize",
                                 sampler=optuna.samplers.TPESampler(seed=0))
    for i in range(4):
        t = search.ask()
        w = t.suggest_float("osr.repulsion_weight", 0.0, 1.0)
        n = t.suggest_categorical("osr.iterations", [2, 3, 5, 8])
        if i == 2:
            t.set_user_attr(hygiene.ERROR, "RuntimeError: non-finite loss at step 3")
            search.tell(t, state=TrialState.FAIL)
        else:
            search.tell(t, 2.0 + w / n)
    search.ask().suggest_float("osr.repulsion_weight", 0.0, 1.0)  # RUNNING
    pareto = optuna.create_study(study_name="search_pareto-89ef", storage=storage, directions=["minimize", "minimize"],
                                 sampler=optuna.samplers.NSGAIISampler(seed=0))
    for i in range(3):
        t = pareto.ask()
        cf = t.suggest_float("quota.capacity_factor", 1.0, 2.0)
        pareto.tell(t, [2.5 - 0.1 * i, cf / 4])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        return json.loads(r.read())


@pytest.fixture
def dashboard(tmp_path):
    """optuna-dashboard's own command on the sweep's storage URL (the README's command line),
    serving on a free local port; yields (base URL, storage URL)."""
    _write_studies(tmp_path)
    url = hygiene.describe_storage(None, tmp_path)  # the URL the sweeper prints: sqlite:///<dir>/optuna.db
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(f"{base}/api/meta")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"optuna-dashboard did not serve on {base}: exit {proc.poll()}\n{proc.stdout.read()}")
                time.sleep(0.3)
        yield base, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _value(v):
    """The dashboard's JSON value (infinities as strings) as a float."""
    return float(v) if isinstance(v, str) else v


def test_dashboard_serves_the_sweeps_trials(dashboard):
    base, url = dashboard
    served = {s["study_name"]: s for s in _get(f"{base}/api/studies")["study_summaries"]}
    stored = {n: optuna.load_study(study_name=n, storage=url) for n in optuna.get_all_study_names(storage=url)}
    assert set(served) == set(stored) == {"search_osr-0123abcd", "search_pareto-89ef"}

    for name, study in stored.items():
        assert served[name]["directions"] == [d.name.lower() for d in study.directions]
        detail = _get(f"{base}/api/studies/{served[name]['study_id']}?after=0")
        trials = {t["number"]: t for t in detail["trials"]}
        assert sorted(trials) == [t.number for t in study.trials]
        for t in study.trials:
            got = trials[t.number]
            assert got["state"].upper() == t.state.name, (name, t.number)
            if t.values is None:
                assert "values" not in got
            else:
                assert [_value(v) for v in got["values"]] == t.values  # same floats, not rounded
            assert {p["name"]: p["param_external_value"] for p in got["params"]} == {
                k: str(v) for k, v in t.params.items()}
            attrs = {a["key"]: a["value"] for a in got["user_attrs"]}
            assert set(attrs) == set(t.user_attrs)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        best = {t["number"] for t in detail["best_trials"]}
        assert best == {t.number for t in study.best_trials} and best <= {t.number for t in complete}

    osr = stored["search_osr-0123abcd"]
    assert [t.state for t in osr.trials].count(TrialState.FAIL) == 1
    assert [t.state for t in osr.trials].count(TrialState.RUNNING) == 1
