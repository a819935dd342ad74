"""Per fused op, inside a ``torch.compile``'d model: the opaque custom op or Inductor's own fusion?

For each op this builds two copies of the same model (the op's variant, e.g. ``swiglu+bhyt`` for
``bhyt_and_mean_square``), compiles one with every op opaque (``steadylm::<op>`` custom ops: the
same fused forward and backward kernels as eager) and one with that op traced through
(:data:`steadylm.kernels.ops.COMPILED_INLINE`: Inductor re-derives its kernels from the same
``_math`` source and may fuse them with the neighbouring ops), and times their training steps in
interleaved rounds. The result per op is the median paired step-time ratio inlined / opaque with its
p20–p80 spread (< 1: Inductor's fusion is faster). The choice is written by hand into
``COMPILED_INLINE`` (and BENCHMARKS.md), not applied automatically: a measurement on a shared
machine is a hint, the default must not change with the load.

    python -m steadylm.bench.op_choice --preset micro --batch 4 --seq 128 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from steadylm.bench.timing import spread, time_call
from steadylm.kernels import ops

__all__ = ["OP_VARIANTS", "ChoiceResult", "measure_op_choice", "main"]

#: op -> the model variant (activation+norm) whose compiled step runs it.
OP_VARIANTS: dict[str, str] = {
    "swiglu": "swiglu+rmsnorm",
    "powlu_glu": "powlu+rmsnorm",
    "swiglu_clip": "swiglu_clip+rmsnorm",
    "rms_norm": "swiglu+rmsnorm",
    "dyt": "swiglu+dyt",
    "bhyt": "swiglu+bhyt",
    "bhyt_and_mean_square": "swiglu+bhyt",
}


@dataclass
class ChoiceResult:
    op: str
    variant: str
    ratios: list[float]  # per round: step time inlined / step time opaque

    def quantiles(self) -> tuple[float, float, float]:
        """(p20, median, p80) of the per-round ratios."""
        return spread(self.ratios)


@contextlib.contextmanager
def _policy(device: str, inline: frozenset[str]) -> Iterator[None]:
    previous = ops.COMPILED_INLINE.get(device)
    ops.COMPILED_INLINE[device] = inline
    try:
        yield
    finally:
        if previous is None:
            ops.COMPILED_INLINE.pop(device, None)
        else:
            ops.COMPILED_INLINE[device] = previous


def _step_fn(preset: str, variant: str, batch: int, seq: int, device: torch.device, seed: int, dtype: str):
    from steadylm.bench.step import train_step
    from steadylm.models import ModelConfig, build_model

    activation, norm = variant.split("+")
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset(preset, activation=activation, norm=norm), device=device)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    step, _ = train_step(model, True, tokens, tokens.device, dtype)
    return step


def measure_op_choice(
    op_names: Sequence[str],
    preset: str = "micro",
    batch: int = 4,
    seq: int = 128,
    rounds: int = 7,
    warmup: int = 2,
    device: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    on_result: Callable[[ChoiceResult], None] | None = None,
) -> list[ChoiceResult]:
    """Paired interleaved rounds, per op: opaque vs inlined inside the compiled training step
    (``dtype``: fp32, or bf16 autocast; None: bf16 on CUDA, fp32 on CPU, as ``bench model``)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    # Every compiled copy is a recompilation of the same forward code object; the default limit (8)
    # would silently send later copies back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    results = []
    for op in op_names:
        variant = OP_VARIANTS[op]
        base = ops.COMPILED_INLINE.get(dev.type, frozenset()) - {op}
        policies = {"opaque": base, "inline": base | {op}}
        steps = {}
        for name, inline in policies.items():
            with _policy(dev.type, inline):
                steps[name] = _step_fn(preset, variant, batch, seq, dev, seed, dtype)
                for _ in range(warmup):  # compiles under this policy
                    steps[name]()
        ratios = []
        for r in range(rounds):
            times = {}
            for name in (("opaque", "inline") if r % 2 == 0 else ("inline", "opaque")):
                with _policy(dev.type, policies[name]):  # the guards see the policy they were traced with
                    times[name] = time_call(steps[name], dev)
            ratios.append(times["inline"] / times["opaque"])
        results.append(ChoiceResult(op, variant, ratios))
        if on_result is not None:
            on_result(results[-1])
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OP_VARIANTS), choices=list(OP_VARIANTS))
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# op choice inside a compiled {args.preset} training step ({args.batch}x{args.seq}), "
          f"{args.rounds} interleaved rounds; load average at start {load:.2f}")  # fmt: skip
    print("| op | variant | inlined / opaque step time (median) | p20–p80 |")
    print("|---|---|---|---|")
    def show(res: ChoiceResult) -> None:
        p20, med, p80 = res.quantiles()
        print(f"| {res.op} | {res.variant} | {med:.3f} | {p20:.3f}–{p80:.3f} |", flush=True)

    measure_op_choice(args.ops, args.preset, args.batch, args.seq, args.rounds, device=args.device, dtype=args.dtype,
                      on_result=show)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average at end {end_load:.2f}")


if __name__ == "__main__":
    main()
