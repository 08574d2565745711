"""`logger.tensorboard=true` (issue #19, part 3): the event files a run writes under
<run dir>/tensorboard/ parse, with TensorBoard's own reader (EventAccumulator), into the same
scalars as metrics.jsonl: every logged number, at the same steps, equal to the float32 rounding of
the JSON value, under its tag: a key that names its section (`train/layer0/cv`, `eval/cv_mean`,
`monitor/...`) is its own tag, a plain Trainer key gets transformers' tag (`loss` -> `train/loss`,
`eval_loss` -> `eval/loss`)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations.integration_utils import rewrite_logs

from conftest import TINY_TRAIN, assert_ok, run_cli

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    assert_ok(run_cli(["train.py", "experiment=demo", *TINY_TRAIN, "logger.tensorboard=true",
                       f"hydra.run.dir={run_dir}"]))
    return run_dir


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} over every event file under <run dir>/tensorboard."""
    files = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert files, "logger.tensorboard=true wrote no event file"
    out = collections.defaultdict(list)
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})  # 0: keep every event
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] += [(e.step, e.value) for e in acc.Scalars(tag)]
    return {t: sorted(v) for t, v in out.items()}


def _tag(key: str) -> str:
    """The tag a metrics.jsonl key should have (module docstring)."""
    return key if "/" in key else next(iter(rewrite_logs({key: 0})))


def _jsonl(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {TensorBoard tag: [(step, float32 value), ...]}."""
    out = collections.defaultdict(list)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[_tag(k)].append((step, float(np.float32(v))))
    return {t: sorted(v) for t, v in out.items()}


def test_event_files_hold_the_scalars_of_metrics_jsonl(run_dir):
    events, logged = _events(run_dir), _jsonl(run_dir)
    # the per-layer router metrics, throughput and the routing monitor are there, not only the Trainer's loss
    assert {"train/loss", "eval/loss", "train/layer0/cv", "eval/layer0/cv", "train/tokens_per_s"} <= set(events)
    assert any(t.startswith("monitor/") for t in events)
    assert set(events) == set(logged), (sorted(set(logged) - set(events)), sorted(set(events) - set(logged)))
    for tag, points in logged.items():
        assert events[tag] == points, tag  # same steps, same values (float32), same number of points
    steps = {s for pts in logged.values() for s, _ in pts}
    assert steps == set(range(1, max(steps) + 1))  # logging_steps=1: every step is there
