"""Peak memory, measured one way for every benchmark (``bench ops`` per op, ``bench model`` per
training step).

* :func:`peak_bytes` — the most memory one call holds *above what existed before it*. CUDA: the
  caching allocator's peak (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``) minus what was allocated before the call. CPU: the profiler's memory
  view (``torch.profiler`` with ``profile_memory=True``): the running sum of the bytes of its
  allocation (+) and free (−) events in time order, and that sum's maximum over the call. The
  events come from the allocator, so they include Inductor's buffers and autograd's saved tensors.
* :func:`state_bytes` — what a model and its optimizer hold between steps: the distinct storages
  of parameters, gradients that exist, buffers and optimizer state, counted from the tensors
  (shared storages such as tied embeddings counted once).
* :func:`train_peak_bytes` — the peak of one training step: :func:`state_bytes` plus
  :func:`peak_bytes` of the step. It is the same quantity on both devices (the CUDA allocator's
  absolute peak would also count every other model alive in the process), and it is at least
  parameters + gradients + optimizer state, since all three exist at the optimizer step.

Profiling perturbs time: call these outside timed runs, after warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from steadylm.bench.timing import synchronize

__all__ = ["peak_bytes", "state_bytes", "tensor_bytes", "train_peak_bytes"]


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory held during ``fn()`` above what was allocated before it (its result is dropped)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by several counts once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterable[Tensor]:
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, Tensor))


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes ``model`` and ``optimizer`` hold between steps: parameters, existing gradients,
    buffers and optimizer state (distinct storages)."""
    return tensor_bytes(_state_tensors(model, optimizer))


def train_peak_bytes(step: Callable[[], Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                     device: torch.device) -> int:  # fmt: skip
    """Peak memory of one training ``step()`` of ``model`` with ``optimizer``: what they hold before
    the step plus the most the step holds above that. Call it after warm-up (the optimizer state
    exists), outside timed runs."""
    return state_bytes(model, optimizer) + peak_bytes(step, device)
