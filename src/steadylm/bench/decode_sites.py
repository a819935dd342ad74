"""Where an eager decode step's time goes, part by part, inside the decode loop itself.

:mod:`.call_overhead` times each call in a hot loop. Inside a decode step the same calls cost more:
between two calls of a norm the step streams every weight of the model through the caches. This
generates with ``decode="eager"`` and times, with forward hooks, each decoder block's four parts
(the pre-attention norm site, attention, the pre-FFN norm site, the FFN) and the block itself,
per generated token, for each variant in interleaved rounds in one process:

    python -m steadylm.bench.decode_sites --preset micro --variants swiglu+rmsnorm,swiglu+bhyt

"rest of block" is the block minus its four parts (residual adds, the BHyT block's ``v + shift``
and its pair methods); "token" is the whole ``generate`` call per new token (embedding, every
block, final norm, LM head, sampling). Figures are medians over the rounds, in µs per token. The
hooks add a few µs per part to the figures; every variant pays the same.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steadylm.errors import SteadyLMError, check_choice

__all__ = ["PARTS", "decode_part_costs", "main"]

#: The timed submodules of a decoder block (a BHyT block names its two sites the same way).
PARTS = ("attn_norm", "attn", "ffn_norm", "ffn")


class _PartTimer:
    """Forward hooks on every block's parts and on the blocks: seconds accumulated per part."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds: dict[str, float] = dict.fromkeys((*PARTS, "block"), 0.0)
        self._handles: list[Any] = []
        for block in model.layers:
            for part in PARTS:
                self._hook(getattr(block, part), part)
            self._hook(block, "block")

    def _hook(self, module: nn.Module, part: str) -> None:
        started: list[float] = []

        def before(mod: nn.Module, args: Any) -> None:
            started.append(time.perf_counter())

        def after(mod: nn.Module, args: Any, out: Any) -> None:
            self.seconds[part] += time.perf_counter() - started.pop()

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def decode_part_costs(
    preset: str,
    variants: Sequence[str],
    *,
    new_tokens: int = 128,
    rounds: int = 6,
    batch: int = 1,
    prompt: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """µs per generated token of each part (:data:`PARTS`, ``"rest of block"``, ``"block"``,
    ``"token"``) for each variant (``activation+norm``), median over ``rounds`` interleaved rounds of
    an eager greedy ``generate`` of ``new_tokens`` tokens after a ``prompt``-token prompt."""
    from steadylm.models import ModelConfig, build_model

    models: dict[str, nn.Module] = {}
    for variant in variants:
        activation, _, norm = variant.partition("+")
        torch.manual_seed(seed)
        models[variant] = build_model(ModelConfig.from_preset(preset, activation=activation, norm=norm))
    vocab = next(iter(models.values())).config.vocab_size
    tokens = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    timers = {variant: _PartTimer(model) for variant, model in models.items()}
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    try:
        for model in models.values():  # warm-up: builds every kernel outside the timing
            model.generate(tokens, 2, temperature=0.0, decode="eager")
        for r in range(rounds):
            # The order rotates each round, as bench model's: with a fixed order the second variant
            # measured 10-15% slower in its attention and FFN, the same code as the first's.
            shift = r % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                model, timer = models[variant], timers[variant]
                timer.reset()
                start = time.perf_counter()
                model.generate(tokens, new_tokens, temperature=0.0, decode="eager")
                total = time.perf_counter() - start
                per_token = {part: seconds * 1e6 / new_tokens for part, seconds in timer.seconds.items()}
                per_token["rest of block"] = per_token["block"] - sum(per_token[p] for p in PARTS)
                per_token["token"] = total * 1e6 / new_tokens
                for part, us in per_token.items():
                    samples[variant].setdefault(part, []).append(us)
    finally:
        for timer in timers.values():
            timer.remove()
    order = (*PARTS, "rest of block", "block", "token")
    return {v: {part: statistics.median(samples[v][part]) for part in order} for v in variants}


def main(argv: Sequence[str] | None = None) -> int:
    from steadylm.models.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro", help="model preset (default micro)")
    parser.add_argument("--variants", default="swiglu+rmsnorm,swiglu+bhyt", help="activation+norm, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    counts = [args.new_tokens, args.rounds, args.batch, args.prompt] + ([args.threads] if args.threads is not None else [])
    if min(counts) < 1:
        parser.error("--new-tokens, --rounds, --batch, --prompt and --threads must be >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any("+" not in v for v in variants):
        parser.error("--variants: a comma-separated list of activation+norm, e.g. swiglu+rmsnorm,swiglu+bhyt")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        check_choice("--preset", args.preset, sorted(PRESETS))
        costs = decode_part_costs(args.preset, variants, new_tokens=args.new_tokens, rounds=args.rounds,
                                  batch=args.batch, prompt=args.prompt)
    except SteadyLMError as err:  # a bad preset, activation or norm: the one-line message
        parser.error(str(err))
    print(f"# eager decode, {args.preset}, batch {args.batch}, {args.prompt}+{args.new_tokens} tokens: µs per token "
          f"(all blocks), median of {args.rounds} interleaved rounds; {torch.get_num_threads()} threads")
    print("| part | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for part in next(iter(costs.values())):
        print(f"| {part} | " + " | ".join(f"{costs[v][part]:.1f}" for v in variants) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
