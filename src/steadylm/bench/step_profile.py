"""Where a training step's time goes: the share of the norms, the activations and the BHyT block
statistic, in an eager and in a compiled step (``torch.profiler``).

Attribution, eager: forward by ``record_function`` ranges — around every norm module
(RMSNorm, LayerNorm, DyT, BHyT), every activation module, and around each separate call of the
reference statistic ``functional.mean_square`` (the BHyT block's v when it is not computed inside
the first site's op); backward by autograd's sequence numbers — each backward node's
``evaluate_function`` range carries the sequence number of the forward op that created it, so a
node belongs to the category whose forward range created it. Compiled: module hooks are traced away,
so only what stays a visible op counts — the ``steadylm::<op>`` / ``steadylm::<op>_backward``
custom ops by name; ops that Inductor fused into its own kernels are not attributable (reported as
such, never guessed). Shares are CPU wall time of the range over the step's (one profiled step after
a warm one).

    python -m steadylm.bench.step_profile --preset micro --batch 8 --seq 256 --variants swiglu+bhyt swiglu+rmsnorm

Deliberately depends only on the model builders, so the same file can profile an older checkout
(``PYTHONPATH=<old>/src python path/to/step_profile.py``) for before/after comparisons.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["CATEGORIES", "OP_CATEGORY", "main", "profile_step"]

CATEGORIES = ("norm", "activation", "statistic")

#: custom op ``steadylm::<op>`` (without the ``_backward`` suffix) -> category.
OP_CATEGORY = {
    "rms_norm": "norm",
    "dyt": "norm",
    "bhyt": "norm",
    "bhyt_and_mean_square": "norm",  # the first BHyT site, with the statistic inside it
    "swiglu": "activation",
    "powlu_glu": "activation",
    "swiglu_clip": "activation",
    "mean_square": "statistic",
}
_EVAL = "autograd::engine::evaluate_function: "
_RANGES = {f"steadylm.{c}" for c in CATEGORIES}


@contextlib.contextmanager
def _labelled(model: nn.Module) -> Iterator[None]:
    """``record_function`` ranges ``steadylm.<category>`` around norm / activation modules and
    around each call of ``functional.mean_square`` (patched for the duration)."""
    from torch.autograd.profiler import record_function

    from steadylm import functional
    from steadylm.nn import BHyT, DyT, LayerNorm, RMSNorm
    from steadylm.nn.activations import Activation

    kinds = {"norm": (RMSNorm, LayerNorm, DyT, BHyT), "activation": (Activation,)}
    handles = []
    for module in model.modules():
        for category, types in kinds.items():
            if isinstance(module, types):
                stack: list = []

                def pre(mod, args, _c=category, _s=stack):
                    _s.append(record_function(f"steadylm.{_c}").__enter__())

                def post(mod, args, out, _s=stack):
                    _s.pop().__exit__(None, None, None)

                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    original = functional.mean_square

    def labelled_mean_square(x):
        with record_function("steadylm.statistic"):
            return original(x)

    functional.mean_square = labelled_mean_square
    try:
        yield
    finally:
        functional.mean_square = original
        for handle in handles:
            handle.remove()


def _descendants(event) -> Iterator:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _category_of_op(name: str) -> str | None:
    if not name.startswith("steadylm::"):
        return None
    op = name[len("steadylm::") :]
    return OP_CATEGORY.get(op[: -len("_backward")] if op.endswith("_backward") else op)


def _shares(events, step_us: float, eager: bool) -> dict[str, float]:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    seen: set[str] = set()
    seq_category: dict[int, str] = {}
    counted_ranges: set[int] = set()
    if eager:
        for e in events:
            if e.name.startswith("steadylm.") and e.name[len("steadylm.") :] in CATEGORIES:
                # A statistic range inside a norm range (BHyT* reference) counts once, as the outer.
                if any(a.name in _RANGES for a in _ancestors(e)):
                    continue
                category = e.name[len("steadylm.") :]
                totals[category] += e.cpu_time_total
                counted_ranges.add(id(e))
                for d in _descendants(e):
                    if d.sequence_nr >= 0:
                        seq_category.setdefault(d.sequence_nr, category)
    for e in events:
        if eager and e.name.startswith(_EVAL) and e.sequence_nr in seq_category:
            totals[seq_category[e.sequence_nr]] += e.cpu_time_total
        elif not eager:
            category = _category_of_op(e.name)
            # outermost steadylm op only (a backward op is not nested in another steadylm op)
            if category and not any(_category_of_op(a.name) for a in _ancestors(e)):
                totals[category] += e.cpu_time_total
                seen.add(category)
    # Compiled: a category with no steadylm op in the step was traced into Inductor's own kernels
    # (ops.COMPILED_INLINE) or is absent; either way its time is not attributable: NaN, not 0.
    return {k: (v / step_us if eager or k in seen else math.nan) for k, v in totals.items()}


def _ancestors(event) -> Iterator:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def profile_step(
    variant: str, preset: str = "micro", batch: int = 8, seq: int = 256, compiled: bool = False, seed: int = 0,
    repeats: int = 3,
) -> dict[str, float]:
    """Shares (fractions of the step) of norm / activation / statistic, and ``step_ms``: the median
    over ``repeats`` profiled steps (after two warm ones)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import profile

    from steadylm.bench.step import train_step
    from steadylm.models import ModelConfig, build_model

    activation, norm = variant.split("+")
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset(preset, activation=activation, norm=norm))
    model.train()
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    step, _ = train_step(model, compiled, tokens, tokens.device)
    runs = []
    with _labelled(model) if not compiled else contextlib.nullcontext():
        step()
        step()
        for _ in range(repeats):
            with profile() as prof:
                with record_function("steadylm.step"):
                    step()
            events = prof.events()
            step_us = next(e.cpu_time_total for e in events if e.name == "steadylm.step")
            shares = _shares(events, step_us, eager=not compiled)
            shares["step_ms"] = step_us / 1e3
            runs.append(shares)
    keys = list(runs[0])
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in keys}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="share of norms, activations and the BHyT statistic in a step")
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["swiglu+bhyt", "swiglu+rmsnorm"])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"# {args.preset} {args.batch}x{args.seq}, load average {os.getloadavg()[0]:.2f}; shares of one "
          f"training step (median of {args.repeats} profiled steps)")  # fmt: skip
    print("| variant | mode | step ms | norm % | activation % | statistic % |")
    print("|---|---|---:|---:|---:|---:|")
    for variant in args.variants:
        for mode in args.modes:
            s = profile_step(variant, args.preset, args.batch, args.seq, compiled=mode == "compiled",
                             repeats=args.repeats)  # fmt: skip
            cells = ["n/a" if math.isnan(s[k]) else f"{100 * s[k]:.1f}" for k in CATEGORIES]
            print(f"| {variant} | {mode} | {s['step_ms']:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
