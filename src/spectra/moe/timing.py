"""Router time vs expert time per MoE layer (paper Table 9), profiler-friendly.

Lives beside the block it instruments: the block only enters `stage`; the routing monitor
(metrics/, one layer up) attaches a `StageTimer` and reads it.

`MoEBlock.forward` wraps its stages in `stage(block, name)`:

    spectra/layer{i}/router    routing inputs + router + context bookkeeping
    spectra/layer{i}/experts   dispatch + expert compute + combine
    spectra/layer{i}/shared    shared expert and its mixing (when the block has one)

Each range is a `torch.profiler.record_function` while a torch profiler is recording, so the
stages show up by name in a profiler trace; and when a `StageTimer` is attached to the block
(`block.stage_timer`, set only for the monitor's timed forward) the stage's wall time is added
to it, with `torch.cuda.synchronize()` on both sides on CUDA so that asynchronous kernels are
charged to the stage that launched them. With neither, `stage` returns a shared no-op context:
the training forward pays one attribute lookup and one flag check per stage.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

_NOOP = nullcontext()


class StageTimer:
    """Wall-clock milliseconds per (layer, stage), summed over the forwards since `reset()`.

    sync_cuda: synchronize the current CUDA device before and after each stage (use on GPU;
    without it a stage would only be charged for the time to *launch* its kernels).
    """

    def __init__(self, sync_cuda: bool = False) -> None:
        self.sync_cuda = sync_cuda
        self.reset()

    def reset(self) -> None:
        self.ms: dict[tuple[int, str], float] = defaultdict(float)

    @contextmanager
    def measure(self, layer: int, name: str):
        if self.sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.ms[(layer, name)] += (time.perf_counter() - t0) * 1e3


@contextmanager
def _timed_range(timer: StageTimer | None, layer: int, name: str):
    # record_function costs a little even with no profiler, so it is entered only when one is on.
    rf = torch.profiler.record_function(f"spectra/layer{layer}/{name}") if torch.autograd._profiler_enabled() else _NOOP
    with rf, (timer.measure(layer, name) if timer is not None else _NOOP):
        yield


def stage(block, name: str):
    """Context manager for one stage of `block` (an MoEBlock): a profiler range and/or timing."""
    timer = getattr(block, "stage_timer", None)
    if timer is None and not torch.autograd._profiler_enabled():
        return _NOOP
    return _timed_range(timer, block.layer_idx, name)
