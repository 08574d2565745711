"""Optuna study hygiene for sweeps: storage, stale trials, resume counting, heartbeats.

Hydra's Optuna sweeper (1.4.0rc3) runs `n_trials` *more* trials every time it starts, leaves the
trials of a killed driver RUNNING forever, and cannot configure Optuna's heartbeat (that only
works with `study.optimize()`, not the ask/tell loop the sweeper uses). Optuna has no
storage-independent way to say "this RUNNING trial has no live owner", so we write that part:

- every trial we ask for records its owner (`spectra_owner`: host, pid) and a heartbeat
  (`spectra_heartbeat`: unix time) as trial user attributes, refreshed by a thread while it runs;
  user attributes live in the study's storage, so this works the same for SQLite, PostgreSQL and
  JournalStorage, on one host or many;
- before each batch, RUNNING trials whose owner process is gone (same host) or whose heartbeat is
  older than the grace period are marked FAIL (`spectra_stale`) and their parameters re-enqueued;
  a retried trial has the same overrides, hence the same cell directory, and resumes its checkpoint;
- `n_trials` is the study's target: the number of finished trials (COMPLETE, or FAIL on its own —
  not stale, not surplus) plus those running; a re-run only tops the study up to it, and several
  workers on one storage share it.

Why not Optuna's own tools: `RDBStorage(heartbeat_interval=…)` with `RetryFailedTrialCallback`
and `MaxTrialsCallback` act only inside `study.optimize()` (its heartbeat thread and stale-trial
check run in `_run_trial`), not in the ask/tell loop a Hydra sweeper needs, and JournalStorage
has no heartbeat (Optuna 5.0); `MaxTrialsCallback` counts trials by state, while our target
must not count stale or surplus FAILs. What Optuna's public API does do is used:
`enqueue_trial` (retries), `Trial.set_user_attr` (owner, heartbeat, marks), `study.tell`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("spectra")

OWNER = "spectra_owner"  # {"host": str, "pid": int}
HEARTBEAT = "spectra_heartbeat"  # unix time of the owner's last sign of life
STALE = "spectra_stale"  # set on a RUNNING trial we failed because its owner was gone
SURPLUS = "spectra_surplus"  # set on a trial asked after the target was already met by others
RETRY_OF = "spectra_retry_of"  # on an enqueued retry: the number of the stale trial it replaces
ERROR = "spectra_error"  # first line of a failed trial's exception


# ----------------------------------------------------------------------------------- storage


def open_storage(url: str | None, sweep_dir: str | Path | None = None):
    """An Optuna storage for a URL string (Hydra can only pass strings, hydra #3269).

    - `None` / "" -> SQLite file `<sweep_dir>/optuna.db` (one writer at a time; a 60 s lock
      timeout lets a few local workers share it);
    - `sqlite:///path.db` -> the same with the timeout;
    - `journal:///path.log` -> `JournalStorage(JournalFileBackend(path))`, safe for many processes
      and NFS (Optuna's recommendation for file-based parallel optimisation);
    - `postgresql://…`, `mysql://…` -> `RDBStorage` (pool_pre_ping, for long sweeps on a cluster).
    """
    if not url:
        if sweep_dir is None:
            raise ValueError("hydra.sweeper.storage: empty and no sweep directory to put optuna.db in")
        url = f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"
    if url.startswith("journal://"):
        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, {"connect_args": {"timeout": 60}})
    if "://" not in url:
        raise ValueError(f"hydra.sweeper.storage: {url!r} is not a storage URL "
                         "(sqlite:///file.db, journal:///file.log, postgresql://user@host/db)")
    return _rdb_storage(url, {"pool_pre_ping": True})


def _rdb_storage(url: str, engine_kwargs: dict, attempts: int = 6):
    """`RDBStorage`, retried: workers started together on an empty database race to create
    Optuna's tables and types, and the loser's DDL fails with a duplicate-object error."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except SQLAlchemyError as e:
            if attempt == attempts - 1:
                raise
            log.info(f"storage not ready ({type(e).__name__}), retrying: another worker may be creating its schema")
            time.sleep(0.5 * (attempt + 1))


def describe_storage(url: str | None, sweep_dir: str | Path | None = None) -> str:
    """The storage URL as shown to the user (the default made explicit, passwords hidden)."""
    if not url:
        return f"sqlite:///{Path(sweep_dir or '.').resolve() / 'optuna.db'}"
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


# ------------------------------------------------------------------------------------ owners


def owner_record() -> dict:
    """This process as a trial owner."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def stale_reason(trial: FrozenTrial, grace_period: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial has nobody working on it (None when it is not stale): its owner process
    on this host is gone, or its heartbeat (or start time, if it never beat) is older than
    `grace_period` seconds. The text goes into the trial's `spectra_error`."""
    if trial.state != TrialState.RUNNING:
        return None
    now = time.time() if now is None else now
    owner = trial.user_attrs.get(OWNER) or {}
    if owner.get("host") == socket.gethostname() and "pid" in owner and not _pid_alive(int(owner["pid"])):
        return f"stale: its owner process {owner['pid']} on {owner['host']} is gone (killed driver?); re-queued"
    beat = trial.user_attrs.get(HEARTBEAT)
    what = "heartbeat"
    if beat is None and trial.datetime_start is not None:
        beat, what = trial.datetime_start.timestamp(), "start (it never sent a heartbeat)"
    if beat is None:
        return "stale: no owner heartbeat and no start time; re-queued"
    age = now - float(beat)
    if age > grace_period:
        where = f" of {owner.get('host')}:{owner.get('pid')}" if owner else ""
        return (f"stale: last {what}{where} {age:.0f} s ago, over hydra.sweeper.grace_period={grace_period:g} s; "
                "re-queued")
    return None


def is_stale(trial: FrozenTrial, grace_period: float, now: float | None = None) -> bool:
    """A RUNNING trial nobody is working on (see `stale_reason`)."""
    return stale_reason(trial, grace_period, now) is not None


def recover_stale_trials(study: optuna.Study, grace_period: float, now: float | None = None) -> list[int]:
    """Mark stale RUNNING trials FAIL and enqueue their parameters again; returns their numbers.

    Several workers may try at once: only the one whose `tell` succeeds re-enqueues (the storage
    refuses to finish a trial twice), so a stale trial is retried exactly once.
    """
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(t, grace_period, now)
        if reason is None:
            continue
        try:
            # Private: `t` is a FrozenTrial (read-only) of a trial another process asked for, and
            # Optuna has no public way to set a user attribute on it — `optuna.Trial(study, id)`
            # needs the storage id, which FrozenTrial keeps only as `_trial_id`.
            study._storage.set_trial_user_attr(t._trial_id, STALE, True)
            study._storage.set_trial_user_attr(t._trial_id, ERROR, reason)  # optuna_trials.csv shows why
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError) as e:  # finished meanwhile (by its owner or another worker)
            log.debug(f"trial {t.number} finished meanwhile: {e}")
            continue
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
        recovered.append(t.number)
    return recovered


# ---------------------------------------------------------------------------------- counting


def counts_toward_target(t: FrozenTrial) -> bool:
    """Finished trials that count against `n_trials`: complete, or failed on their own."""
    if t.state == TrialState.COMPLETE or t.state == TrialState.PRUNED:
        return True
    return t.state == TrialState.FAIL and not t.user_attrs.get(STALE) and not t.user_attrs.get(SURPLUS)


def progress(study: optuna.Study) -> dict[str, int]:
    """{"counted": finished trials that count, "running": RUNNING, "complete", "failed"}."""
    trials = study.get_trials(deepcopy=False)
    return {
        "counted": sum(counts_toward_target(t) for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL and counts_toward_target(t) for t in trials),
    }


def remaining(study: optuna.Study, target: int) -> int:
    """How many more trials to ask for: target minus finished (counted) minus running."""
    p = progress(study)
    return max(0, target - p["counted"] - p["running"])


def is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """True when trials numbered below `number` (counted or still running) already meet the target.

    Two workers that both see "one to go" ask one trial each; the later-numbered one is surplus.
    Trial numbers are assigned by the storage, so every worker reaches the same verdict.
    """
    before = [t for t in study.get_trials(deepcopy=False) if t.number < number]
    live = sum(counts_toward_target(t) or t.state == TrialState.RUNNING for t in before)
    return live >= target


def drop_surplus(study: optuna.Study, trial: optuna.Trial) -> None:
    """Finish a surplus trial without running it (FAIL, marked so it never counts)."""
    trial.set_user_attr(SURPLUS, True)
    study.tell(trial, state=TrialState.FAIL)
    if trial.user_attrs.get(RETRY_OF) is not None:  # don't lose a retry: hand it back to the queue
        study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.user_attrs[RETRY_OF]},
                            skip_if_exists=False)


# ------------------------------------------------------------------------------- heartbeats


class Heartbeat:
    """Background thread that stamps `spectra_heartbeat` on the trials this worker is running."""

    def __init__(self, study: optuna.Study, interval: float):
        self.study, self.interval = study, float(interval)
        self._trials: dict[int, optuna.Trial] = {}  # trial number -> the trial this worker asked for
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spectra-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def claim(self, trials: Iterable[optuna.Trial]) -> None:
        """Record this process as owner of `trials` and beat for them until `release`."""
        owner = owner_record()
        for t in trials:
            t.set_user_attr(OWNER, owner)
            t.set_user_attr(HEARTBEAT, time.time())
            with self._lock:
                self._trials[t.number] = t

    def release(self, trials: Iterable[optuna.Trial]) -> None:
        with self._lock:
            for t in trials:
                self._trials.pop(t.number, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                trials = list(self._trials.values())
            for t in trials:
                try:
                    t.set_user_attr(HEARTBEAT, time.time())
                except Exception as e:  # finished meanwhile, or a storage hiccup: beat again next time
                    log.debug(f"heartbeat for trial {t.number} skipped: {e}")


# ---------------------------------------------------------------------------------- samplers


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed every random state a sampler holds (and those of samplers it wraps) with `seed`.

    Why by hand: Optuna samplers take a seed only at construction and `reseed_rng()` draws from
    OS entropy (no public `reseed_rng(seed)`). Optuna's `LazyRandomState` is private
    (`optuna.samplers._lazy_random_state`), so it is recognised by type name, not imported. A seeded sampler re-created by a resumed or second worker would replay the same
    suggestions; seeding with (sweep seed + trial number) keeps each trial reproducible and
    distinct however the trials are split across workers and restarts.
    """
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if depth > 3 or id(obj) in seen:
            return
        seen.add(id(obj))
        for v in vars(obj).values() if hasattr(obj, "__dict__") else ():
            if isinstance(v, np.random.RandomState):
                v.seed(seed % 2**32)
            elif type(v).__name__ == "LazyRandomState":
                v.rng.seed(seed % 2**32)
            elif isinstance(v, optuna.samplers.BaseSampler):
                visit(v, depth + 1)

    visit(sampler, 0)
