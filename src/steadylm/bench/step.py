"""The training step every benchmark times or profiles (``bench model``, ``bench.step_profile``,
``bench.op_choice``): one definition, so that their numbers describe the same work."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm.models import takes_targets
from steadylm.train.config import OPTIMIZER_IMPLEMENTATIONS

__all__ = ["autocast", "logits_of", "train_step"]


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``dtype="bf16"``, nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(model: nn.Module, tokens: Tensor) -> Tensor:
    """Logits of a steadylm model (a tensor) or a Hugging Face one (``.logits``)."""
    out = model(tokens)
    return out if isinstance(out, Tensor) else out.logits


def train_step(model: nn.Module, compiled: bool, tokens: Tensor, device: torch.device,
               dtype: str = "fp32") -> tuple[Callable[[], None], torch.optim.Optimizer]:  # fmt: skip
    """The training step every benchmark times or profiles: forward (``torch.compile(model)`` if
    ``compiled``), cross-entropy on ``tokens`` shifted by one, backward, fused AdamW, and the model's
    ``after_optimizer_step``; returned with its optimizer (whose state the peak memory counts)."""
    forward = torch.compile(model) if compiled else model
    groups = model.param_groups(0.1) if hasattr(model, "param_groups") else model.parameters()
    # Fused, as `steadylm train`, HF's Trainer (torch >= 2.8) and torchtitan run it by default.
    optimizer = torch.optim.AdamW(groups, lr=1e-5, **OPTIMIZER_IMPLEMENTATIONS["fused"])
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    own_loss = takes_targets(model)  # steadylm: the LM head and its loss fused, as `steadylm train` runs it
    model.train()

    def step() -> None:
        with autocast(device, dtype):
            if own_loss:
                loss = forward(inputs, targets=targets)
            else:
                logits = logits_of(forward, inputs)
        if not own_loss:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step(1, 10**9)

    return step, optimizer
