"""``steadylm bench model --claim bhyt``: a published efficiency claim, answered by one command.

The BHyT paper reports that its block form trains 1.6% and generates 1.77% faster than RMSNorm,
because a BHyT block reduces over the hidden dimension once where an RMSNorm block reduces twice.
This view measures exactly that pair — ``swiglu+bhyt`` against ``swiglu+rmsnorm``, same preset,
same shapes, one process — for training and for generation at each batch size, eager and
compiled, and prints the paired throughput ratios (median and p20–p80 over interleaved rounds:
every round runs both rows, so load from other processes hits both alike) next to the paper's
figures, with the load average before and after, and a verdict on each: the paper's figure is met
or not met only where the median's 95% interval (:func:`steadylm.bench.timing.median_interval`)
lies wholly on one side of it, and is otherwise inconclusive — at a few percent of noise per round,
a 1.6% effect takes dozens of rounds to resolve, and the view says so instead of calling a coin
toss. The timing itself is
:func:`steadylm.bench.model.run_model_bench` (the same rounds, pairing and quantiles as the full
table); only the rows and the presentation are specific to the claim.

The paper's numbers are from its own models and GPUs; a CPU run checks the direction and the size
of the effect on this implementation, not the paper's setting.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from steadylm.bench.model import ModelBenchConfig, ModelBenchResult, paired_ratio, run_model_bench
from steadylm.bench.timing import median_interval, spread, verdict
from steadylm.errors import ConfigError, check_choice

__all__ = ["CLAIMS", "Claim", "ClaimLine", "claim_config", "claim_lines", "render_claim", "run_claim"]


@dataclass(frozen=True)
class Claim:
    """A published throughput claim: ``variant`` over ``baseline``, per measurement kind."""

    variant: str
    baseline: str
    paper: dict[str, float]  # "train" / "generate" -> claimed throughput ratio
    source: str
    default_preset: str = "micro"


CLAIMS: dict[str, Claim] = {
    "bhyt": Claim(
        variant="swiglu+bhyt",
        baseline="swiglu+rmsnorm",
        paper={"train": 1.016, "generate": 1.0177},
        source="BHyT paper: +1.6% training and +1.77% generation throughput over RMSNorm",
    ),
}


@dataclass
class ClaimLine:
    preset: str
    measure: str  # "train" or "generate-bN"
    mode: str
    ratios: list[float]  # per round: variant throughput / baseline throughput
    paper: float

    def summary(self) -> tuple[float, float, float]:
        """(p20, median, p80) of the paired ratios."""
        return spread(self.ratios)

    def interval(self) -> tuple[float, float] | None:
        """The 95% interval of the median ratio (None: too few rounds for one)."""
        return median_interval(self.ratios)

    def vs_paper(self) -> str:
        """``met`` / ``not met`` / ``inconclusive``: the median ratio against the paper's figure."""
        return verdict(self.ratios, self.paper)

    def vs_baseline(self) -> str:
        """``faster`` / ``slower`` than the baseline, or ``not resolved`` (the interval holds 1)."""
        interval = self.interval()
        if interval is not None and interval[0] > 1.0:
            return "faster"
        if interval is not None and interval[1] < 1.0:
            return "slower"
        return "not resolved"


def _get(name: str) -> Claim:
    check_choice("claim", name, sorted(CLAIMS))
    return CLAIMS[name]


def claim_config(base: ModelBenchConfig, name: str) -> ModelBenchConfig:
    """``base`` restricted to the claim's two variants (shapes, rounds, modes, device kept); the
    default preset list becomes the claim's preset. No HF row, no profile: only the pair is timed."""
    claim = _get(name)
    presets = base.presets
    if tuple(presets) == tuple(ModelBenchConfig().presets):
        presets = (claim.default_preset,)
    act_v, norm_v = claim.variant.split("+")
    act_b, norm_b = claim.baseline.split("+")
    if act_v != act_b:  # the bench's variants are a grid: activations × norms
        raise ConfigError(f"claim {name}: variant and baseline must share the activation")
    return dataclasses.replace(base, presets=tuple(presets), activations=(act_v,), norms=(norm_b, norm_v),
                               hf=False, moe_loop=False, profile=False, memory=False)  # fmt: skip


def claim_lines(result: ModelBenchResult, name: str) -> list[ClaimLine]:
    claim = _get(name)
    cfg = result.config
    measures = (["train"] if "train" in cfg.measures else []) + (
        [f"generate-b{b}" for b in cfg.gen_batches] if "generate" in cfg.measures else []
    )
    lines = []
    for preset in cfg.presets:
        for measure in measures:
            for mode in cfg.modes:
                ratios = paired_ratio(result, (preset, claim.variant, mode, measure), (preset, claim.baseline, mode, measure))
                if ratios:
                    kind = "train" if measure == "train" else "generate"
                    lines.append(ClaimLine(preset, measure, mode, ratios, claim.paper[kind]))
    return lines


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def render_claim(
    result: ModelBenchResult, name: str, load_before: float | None, load_after: float | None, command: str
) -> str:
    """The claim as a markdown block: the ratio table, the paper's figures, the load, the command."""
    claim = _get(name)
    cfg = result.config
    lines = [
        f"### Claim {name}: {claim.variant} / {claim.baseline} throughput",
        "",
        f"{claim.source}. Measured: {result.device}, {cfg.dtype}, train {cfg.batch}×{cfg.seq}, "
        f"generate {cfg.prompt}+{cfg.new_tokens} tokens; paired ratios over {cfg.rounds} interleaved rounds "
        "(> 1: BHyT faster). A verdict is met / not met (faster / slower) only where the median's "
        "distribution-free 95% interval lies wholly on one side; otherwise inconclusive (not resolved).",
        "",
        "| preset | measure | mode | ratio (median) | p20–p80 | 95% interval of the median | paper | vs paper "
        f"| vs {claim.baseline.split('+')[1]} |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for line in claim_lines(result, name):
        p20, med, p80 = line.summary()
        interval = line.interval()
        shown = f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "too few rounds"
        lines.append(
            f"| {line.preset} | {line.measure} | {line.mode} | {med:.3f} | {p20:.3f}–{p80:.3f} | {shown} | "
            f"{line.paper:.4f} | {line.vs_paper()} | {line.vs_baseline()} |"
        )
    cores = os.cpu_count()
    if load_before is not None and load_after is not None:
        lines += ["", f"load average (1 min) before {load_before:.2f}, after {load_after:.2f} ({cores} cores)"]
    lines += ["", f"command: `{command}`"]
    return "\n".join(lines) + "\n"


def run_claim(base: ModelBenchConfig, name: str, command: str, progress=None) -> tuple[ModelBenchResult, str]:
    """Time the claim's pair with ``base``'s shapes and return the result and its rendering."""
    config = claim_config(base, name)
    config.validate()
    before = _load()
    result = run_model_bench(config, progress=progress)
    return result, render_claim(result, name, before, _load(), command)
