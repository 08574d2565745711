"""Statistics a router collects over one optimizer step's training forwards, summed over the
data-parallel ranks: the shared plumbing of `aux_free` (load for its bias update) and
`global_aux` (the global-batch f_e of its balance loss).

Rules every collecting router follows (as SPECTRA's running Gram does):
- only training forwards collect, and not the forward that gradient checkpointing recomputes
  inside autograd's backward pass (`in_backward`): it is the same micro-batch again;
- `all_reduce_sum` is a collective: with torch.distributed initialised (world size > 1) every rank
  must enter it the same number of times, so routers call it from places every rank reaches
  equally often (each training forward; `on_optimizer_step`, which RouterStepCallback calls on
  every rank at every step and at train begin), with zeros when a rank collected nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass: where gradient checkpointing (torch's
    reentrant and non-reentrant variants, DeepSpeed's) recomputes a forward."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)  # what torch's own module trackers use
    return task_id is not None and task_id() != -1


def data_parallel_world() -> int:
    """World size of an initialised torch.distributed default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over the data-parallel ranks (a new fp32+ tensor on x's device); `x` itself
    (as fp32+) when not distributed. gloo reduces CPU tensors, NCCL CUDA ones: the sum is
    communicated on the backend's device."""
    out = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    if data_parallel_world() == 1:
        return out
    comm = out.to("cuda" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    return comm.to(x.device)
