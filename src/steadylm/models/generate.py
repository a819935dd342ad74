"""Text generation: a compiled one-token decode step over a static KV cache (the gpt-fast approach),
and the eager loop over a growing cache.

``generate(model, tokens, max_new_tokens, ..., decode="compiled")`` is what
:meth:`steadylm.models.Transformer.generate` calls.

Compiled decode (default)
-------------------------
* :class:`StaticKVCache` preallocates keys and values for the whole context (``max_seq_len``
  positions) once per (model, batch size, dtype, device) and is reused across calls. The positions
  being written are a *device tensor* (``input_pos``): keys/values are written with
  ``index_copy_`` and attention reads all ``max_seq_len`` slots under a causal mask row selected by
  ``input_pos``, so every decode step has the same shapes and the same graph.
* The one-token step (embedding → blocks → final norm → LM head → last-position logits) is compiled
  once per model with ``fullgraph=True, dynamic=False``; on CUDA with CUDA graphs
  (``mode="reduce-overhead"``, the cache tensors marked as static addresses). Each model gets its own
  copy of the step's code object, so models never share (or exhaust) one Dynamo cache, and after the
  first step no token recompiles (tested with ``torch._dynamo.config.error_on_recompile``). On CPU
  its matmuls of up to :data:`steadylm.kernels.small_mm.MAX_ROWS` rows (batch ≤ 16) are generated
  by Inductor as reductions instead of calling BLAS (:mod:`steadylm.kernels.small_mm`).
* Dynamo's guards are evaluated on the first step of each call only (``skip_guard_eval_unsafe`` for
  the rest of the call, when nothing they check can change).
* Nothing is read back to the host per token: sampling is ``argmax(p / E)`` with ``E ~ Exp(1)``
  (an exact draw from ``p`` without ``multinomial``), the position advances on the device, the loop
  length is known in advance. The prompt (prefill) runs eagerly through the same cache.
* BHyT blocks freeze their per-layer shift ``c_ℓ·λ₁²/κ²`` once per call (``begin_inference``); the
  step reads it as a tensor, so it costs one add per block and no extra work per token.

Eager decode (``decode="eager"``)
---------------------------------
The plain loop over :class:`~steadylm.models.attention.KVCache`, which grows by one position per token.

Both paths crop the context to the last ``max_seq_len`` tokens once the sequence outgrows it (as
nanoGPT does), re-filling the cache from that window.
"""

from __future__ import annotations

import contextlib
import math
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steadylm.errors import ConfigError, check_choice
from steadylm.kernels.small_mm import decode_compile_options
from steadylm.models.attention import KVCache, RotaryEmbedding
from steadylm.nn import BHyTPair

__all__ = ["DECODE_MODES", "StaticKVCache", "generate", "sample_next"]

DECODE_MODES = ("compiled", "eager")


class StaticKVCache:
    """Preallocated keys/values ``[batch, n_kv_heads, max_len, head_dim]`` per layer.

    Set :attr:`input_pos` (``[seq]`` int64 device tensor: the positions of the tokens of the next
    forward) before each forward; the cache writes them in place and masks attention causally by
    position, so the shapes never change between decode steps. Same interface as
    :class:`~steadylm.models.attention.KVCache` (``begin_forward``, ``attend``, ``end_forward``).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # Row p: the positions a query at position p may attend to (0..p).
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)
        for t in (*self.keys, *self.values, self.causal):
            # Stable addresses: CUDA graphs may then update the cache in place across replays.
            torch._dynamo.mark_static_address(t)

    def begin_forward(self, rope: RotaryEmbedding, seq: int) -> tuple[Tensor, Tensor]:
        """RoPE tables at :attr:`input_pos` (``[seq, rotary_dim]`` each)."""
        return rope.cos.index_select(0, self.input_pos), rope.sin.index_select(0, self.input_pos)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write ``k, v`` at :attr:`input_pos` and attend ``q`` over every slot, causally masked."""
        keys, values = self.keys[layer], self.values[layer]
        # index_put_ (not index_copy_): Inductor lowers it in place on the cache, with no copy of
        # the whole cache per step.
        keys[:, :, self.input_pos] = k.to(keys.dtype)
        values[:, :, self.input_pos] = v.to(values.dtype)
        mask = self.causal.index_select(0, self.input_pos)
        grouped = q.shape[1] != keys.shape[1]
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=grouped)

    def end_forward(self, seq: int) -> None:
        """Nothing to advance: the caller sets the next :attr:`input_pos`."""


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """One token per row from ``logits`` ``[batch, vocab]`` -> ``[batch, 1]``, without host sync.

    ``temperature == 0`` is greedy; ``top_k`` keeps the k largest logits. Sampling draws
    ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` i.i.d.: ``E_i / p_i`` is exponential with rate
    ``p_i``, and the smallest of independent exponentials is index ``i`` with probability
    ``p_i / Σp = p_i`` — an exact draw from ``p`` (zero-probability tokens are never drawn).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def validate_generate_args(
    tokens: Tensor, max_new_tokens: int, temperature: float, top_k: int | None, decode: str
) -> None:
    """Raise :class:`ConfigError` naming the bad argument and its allowed range."""
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ConfigError(f"tokens must be [batch, seq] with seq >= 1, got {tuple(tokens.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    check_choice("decode", decode, DECODE_MODES)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokens: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    decode: str = "compiled",
) -> Tensor | tuple[Tensor, Tensor]:
    """Continue ``tokens`` ``[batch, seq]`` by ``max_new_tokens`` sampled tokens (see the module doc);
    also the model's method ``model.generate(tokens, ...)``.

    ``temperature == 0`` is greedy; ``top_k`` keeps the k most likely tokens. ``decode``:
    ``"compiled"`` (a compiled one-token step over a static KV cache, no recompiles or host
    syncs per token) or ``"eager"``. Once the sequence outgrows ``max_seq_len`` the context is
    cropped to the last ``max_seq_len`` tokens. BHyT blocks compute their per-layer scalar once for
    the call. Returns the extended tokens, and with ``return_logits`` also the fp32 logits each new
    token was drawn from (``[batch, new, vocab]``). The model's training mode is restored afterwards.
    """
    validate_generate_args(tokens, max_new_tokens, temperature, top_k, decode)
    if max_new_tokens == 0:
        empty = torch.zeros(tokens.shape[0], 0, model.config.vocab_size, device=tokens.device)
        return (tokens, empty) if return_logits else tokens

    was_training = model.training
    bhyt_blocks = [block for block in model.layers if isinstance(block, BHyTPair)]
    model.eval()
    for block in bhyt_blocks:
        block.begin_inference()
    try:
        run = _decode_compiled if decode == "compiled" else _decode_eager
        request = _Request(max_new_tokens, temperature, top_k, generator, return_logits)
        new_tokens, drawn_from = run(model, tokens, request)
    finally:
        for block in bhyt_blocks:
            block.end_inference()
        model.train(was_training)
    sequence = torch.cat([tokens, new_tokens], dim=1)
    return (sequence, torch.stack(drawn_from, dim=1)) if return_logits else sequence


_Result = tuple[Tensor, list[Tensor]]


@dataclass(frozen=True)
class _Request:
    """What a :func:`generate` call asks of a decoder (``_decode_eager`` / ``_decode_compiled``)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    generator: torch.Generator | None
    return_logits: bool

    def sample(self, logits: Tensor) -> Tensor:
        return sample_next(logits, self.temperature, self.top_k, self.generator)


def _decode_eager(model: nn.Module, tokens: Tensor, request: _Request) -> _Result:
    max_new_tokens = request.max_new_tokens
    context = model.config.max_seq_len
    cache = model.new_kv_cache(tokens.shape[0])
    sequence = tokens
    logits = model(sequence[:, -context:], kv_cache=cache)[:, -1].float()
    drawn_from: list[Tensor] = []
    for i in range(max_new_tokens):
        next_token = request.sample(logits)
        if request.return_logits:
            drawn_from.append(logits)
        sequence = torch.cat([sequence, next_token], dim=1)
        if i == max_new_tokens - 1:
            break
        if cache.pos < context:
            logits = model(next_token, kv_cache=cache)[:, -1].float()
        else:
            cache.reset()
            logits = model(sequence[:, -context:], kv_cache=cache)[:, -1].float()
    return sequence[:, tokens.shape[1] :], drawn_from


def _step(model: nn.Module, cache: StaticKVCache, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """Forward ``tokens`` at positions ``input_pos`` through the static cache; last-position logits."""
    cache.input_pos = input_pos
    return model(tokens, kv_cache=cache)[:, -1].float()


@dataclass
class _DecodeState:
    """What one model keeps between compiled generate calls."""

    step: Callable[[nn.Module, StaticKVCache, Tensor, Tensor], Tensor]
    caches: dict[tuple[int, torch.dtype, torch.device], StaticKVCache]


_STATE: "weakref.WeakKeyDictionary[nn.Module, _DecodeState]" = weakref.WeakKeyDictionary()


def _compiled_step(model: nn.Module, device: torch.device) -> Callable[..., Tensor]:
    """A per-model compiled copy of :func:`_step` (own code object, so its own Dynamo cache)."""
    code = _step.__code__.replace()
    fresh = types.FunctionType(code, _step.__globals__, f"_step_{id(model):x}")
    if device.type == "cuda":
        return torch.compile(fresh, fullgraph=True, dynamic=False, mode="reduce-overhead")
    return torch.compile(fresh, fullgraph=True, dynamic=False, options=decode_compile_options(device))


def decode_state(model: nn.Module, batch_size: int, dtype: torch.dtype, device: torch.device) -> tuple[Any, StaticKVCache]:
    """The model's compiled step and its static cache for ``(batch_size, dtype, device)``."""
    state = _STATE.get(model)
    if state is None:
        state = _STATE[model] = _DecodeState(_compiled_step(model, device), {})
    key = (batch_size, dtype, device)
    if key not in state.caches:
        c = model.config
        state.caches[key] = StaticKVCache(
            c.n_layers, batch_size, c.max_seq_len, c.n_kv_heads, c.head_dim, dtype=dtype, device=device
        )
    return state.step, state.caches[key]


def _skip_guard_evaluation() -> contextlib.AbstractContextManager[Any]:
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


def _cache_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype keys come out of the projections in: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.lm_head.weight.dtype


def _decode_compiled(model: nn.Module, tokens: Tensor, request: _Request) -> _Result:
    max_new_tokens = request.max_new_tokens
    context = model.config.max_seq_len
    device = tokens.device
    batch = tokens.shape[0]
    step, cache = decode_state(model, batch, _cache_dtype(model, device), device)
    cuda_graphs = device.type == "cuda"

    def prefill(window: Tensor) -> Tensor:
        return _step(model, cache, window, torch.arange(window.shape[1], device=device))

    window = tokens[:, -context:]
    logits = prefill(window)
    pos = window.shape[1]  # host-side count of filled positions: known without reading the device
    input_pos = torch.full((1,), pos, dtype=torch.long, device=device)
    new_tokens = torch.empty(batch, max_new_tokens, dtype=tokens.dtype, device=device)
    drawn_from: list[Tensor] = []
    # After the first step of this call has passed Dynamo's guards (compiling if needed), nothing they
    # check can change until the call ends (same model, cache, shapes, grad/autocast state), so the
    # later steps skip re-evaluating them — about a fifth of a micro-preset CPU step.
    guards: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    for i in range(max_new_tokens):
        next_token = request.sample(logits)
        new_tokens[:, i : i + 1] = next_token
        if request.return_logits:
            drawn_from.append(logits.clone())  # a CUDA-graph output is overwritten by the next replay
        if i == max_new_tokens - 1:
            break
        if pos < context:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with guards():
                logits = step(model, cache, next_token, input_pos)
            guards = _skip_guard_evaluation
            input_pos.add_(1)
            pos += 1
        else:  # the window is full: re-fill the cache from the last `context` tokens
            logits = prefill(torch.cat([tokens, new_tokens[:, : i + 1]], dim=1)[:, -context:])
    return new_tokens, drawn_from
