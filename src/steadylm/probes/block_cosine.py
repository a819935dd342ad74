"""``BlockCosineProbe``: how much each decoder block changes the residual stream (the depth
ladder's "lazy block" measurement), as a probe of the train ↔ probes contract."""

from __future__ import annotations

from typing import Any

from steadylm.probes import keys as K

__all__ = ["BlockCosineProbe"]


class BlockCosineProbe:
    """Mean cosine similarity between each block's input and output over the step's tokens,
    ``depth/layer{i}/cos``, sampled on step 1 and every ``every`` steps (the train ↔ probes
    contract of docs/ARCHITECTURE.md)."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._handles: list[Any] = []
        self._values: dict[int, Any] = {}

    def begin_step(self, step: int, model: Any) -> None:
        self._clear()
        if not (step == 1 or step % self.every == 0):
            return
        import torch

        for i, block in enumerate(model.layers):
            def hook(_mod: Any, args: tuple, kwargs: dict, output: Any, i: int = i) -> None:
                x = args[0] if args else kwargs.get("x")
                out = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                    with torch.no_grad():
                        cos = torch.nn.functional.cosine_similarity(x.detach().float(), out.detach().float(), dim=-1)
                        self._values[i] = cos.mean()

            self._handles.append(block.register_forward_hook(hook, with_kwargs=True))

    def end_step(self, step: int, model: Any) -> dict[str, float]:
        out = {K.layer_key(K.DEPTH, i, "cos"): float(v) for i, v in sorted(self._values.items())}
        self._clear()
        return out

    def _clear(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._values.clear()
