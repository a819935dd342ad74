"""``steadylm bench model``: training and generation throughput of whole models, per variant.

For each preset × variant (activation + norm) × mode (``eager`` / ``compiled``) this measures

* **train**: tokens/s of one training step — forward, cross-entropy, backward, AdamW step,
  ``after_optimizer_step`` — on ``batch × seq`` random tokens;
* **generate-bN**: tokens/s of ``model.generate`` continuing an ``N × prompt`` prompt by ``new``
  greedy tokens (``decode="eager"``: the eager loop over a growing cache; ``"compiled"``: the
  compiled one-token step over the static cache, :mod:`steadylm.models.generate`);
* with transformers installed, the same-shape Hugging Face ``LlamaForCausalLM`` as the row
  ``hf-llama`` (train step eager and ``torch.compile``'d; ``generate`` eager, HF's default path),
  and HF ``generate`` of the ``steadylm`` model type (rows ``hf-steadylm:VARIANT``,
  :mod:`steadylm.bench.hf_generate`);
* **profile** (eager, once per variant): the share of the training step spent in the norms and in
  the activations, from ``torch.profiler`` — forward via ``record_function`` ranges around each
  norm / activation module, backward from the autograd nodes of the fused ops. It is the ceiling of
  what faster norm or activation kernels could give this step;
* **peak memory** (each train row once, after warm-up, outside the timed rounds — profiling
  perturbs time): the peak of one training step, :func:`steadylm.bench.memory.train_peak_bytes` —
  what the model and its optimizer hold between steps (parameters, buffers, AdamW state) plus the
  most the step holds above that (CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``; CPU: the profiler's memory view, its allocation and free events
  summed in time order). Reported in MiB and as a ratio to ``hf-llama`` in the same mode.

Timing is interleaved: every round runs every row once, in an order rotated each round, so load
from other processes hits all rows alike. For each round, the *paired* ratio of a row to the
baseline (``swiglu+rmsnorm``, same preset, mode and measurement) is its throughput divided by the
baseline's throughput in that same round; the table reports the median ratio and its p20–p80
spread over rounds (ratios > 1: faster than the baseline).
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

import steadylm
from steadylm.bench.memory import train_peak_bytes
from steadylm.bench.step import autocast as _autocast
from steadylm.bench.step import train_step
from steadylm.bench.timing import median_interval, quantile, synchronize, time_call
from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError, check_choice

__all__ = [
    "BASELINE",
    "HF_VARIANT",
    "ModelBenchConfig",
    "Row",
    "comparisons",
    "csv_rows",
    "profile_shares",
    "render_markdown",
    "render_table",
    "run_model_bench",
]

BASELINE = "swiglu+rmsnorm"
HF_VARIANT = "hf-llama"
MODES = ("eager", "compiled")
MEASURES = ("train", "generate")
ACTIVATION_CHOICES = ("swiglu", "swiglu_clip", "powlu")
NORM_CHOICES = ("rmsnorm", "bhyt", "bhyt_star", "dyt")


@dataclass
class ModelBenchConfig:
    """What to run (defaults: the issue's protocol; ``--quick`` in the CLI shrinks it)."""

    presets: Sequence[str] = spec_field(("micro", "nano-moe"), help="model presets", flag="--presets")
    activations: Sequence[str] = spec_field(ACTIVATION_CHOICES, help="activations", flag="--activations")
    norms: Sequence[str] = spec_field(NORM_CHOICES, help="norms", flag="--norms")
    modes: Sequence[str] = spec_field(MODES, help="eager,compiled", flag="--modes")
    measures: Sequence[str] = spec_field(MEASURES, help="train,generate", flag="--measures")
    batch: int = spec_field(8, help="training batch", flag="--batch")
    seq: int = spec_field(256, help="training sequence length", flag="--seq")
    gen_batches: Sequence[int] = spec_field((1, 8), help="generation batch sizes", flag="--gen-batches")
    prompt: int = spec_field(16, help="prompt tokens", flag="--prompt")
    new_tokens: int = spec_field(128, help="generated tokens", flag="--new-tokens")
    rounds: int = spec_field(5, help="interleaved timed rounds", flag="--rounds")
    warmup: int = spec_field(1, help="untimed calls per row after the first", flag="--warmup")
    dtype: str = "fp32"  # "bf16": autocast bf16 (fp32 master weights); the CLI picks bf16 on CUDA
    hf: bool = spec_field(True, help="add the Hugging Face LlamaForCausalLM row", flag="--hf")
    moe_loop: bool = spec_field(False, help="MoE presets: add swiglu+rmsnorm:loop, the per-expert loop "
                                "dispatch (graph breaks)", flag="--moe-loop")
    profile: bool = spec_field(True, help="measure the profiler shares of norms and activations", flag="--profile")
    memory: bool = spec_field(True, help="measure the peak memory of one training step per train row (once, "
                              "after warm-up, outside the timed rounds)", flag="--memory")
    device: str | None = spec_field(None, help="cpu or cuda (None: cuda when available)", flag="--device")
    seed: int = 0

    def validate(self) -> None:
        from steadylm.models import PRESETS

        for name, values, allowed in (("presets", self.presets, list(PRESETS)),
                                      ("activations", self.activations, ACTIVATION_CHOICES),
                                      ("norms", self.norms, NORM_CHOICES), ("modes", self.modes, MODES),
                                      ("measures", self.measures, MEASURES)):  # fmt: skip
            if not values:
                raise ConfigError(f"{name} must name at least one of {list(allowed)}")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ConfigError(f"{name}: unknown {unknown}; allowed: {list(allowed)}")
        for name, value, low in (("batch", self.batch, 1), ("seq", self.seq, 2), ("prompt", self.prompt, 1),
                                 ("new_tokens", self.new_tokens, 1), ("rounds", self.rounds, 1),
                                 ("warmup", self.warmup, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.gen_batches or any(not isinstance(b, int) or b < 1 for b in self.gen_batches):
            raise ConfigError(f"gen_batches must be integers >= 1, got {list(self.gen_batches)}")
        check_choice("dtype", self.dtype, ("fp32", "bf16"))

    def variants(self) -> list[str]:
        """``activation+norm`` names, the baseline first."""
        names = [f"{a}+{n}" for n in self.norms for a in self.activations]
        if BASELINE in names:
            names.remove(BASELINE)
        return [BASELINE] + names


@dataclass
class Row:
    """One measured row: per-round seconds of one call, and the tokens that call produces."""

    preset: str
    variant: str
    mode: str
    measure: str  # "train" or "generate-b{N}"
    tokens_per_call: int
    times_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # paired throughput ratio vs the baseline

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.preset, self.variant, self.mode, self.measure)

    def tokens_per_s(self) -> list[float]:
        return [self.tokens_per_call / t for t in self.times_s]


# --------------------------------------------------------------------------------------------
# the models and their calls
# --------------------------------------------------------------------------------------------


LOOP_SUFFIX = ":loop"  # a MoE variant forced to the per-expert module loop (the dispatch before sync-free)


def _build(preset: str, variant: str, device: torch.device, seed: int) -> nn.Module:
    from steadylm.models import ModelConfig, build_model

    name, loop = (variant[: -len(LOOP_SUFFIX)], True) if variant.endswith(LOOP_SUFFIX) else (variant, False)
    activation, norm = name.split("+")
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset(preset, activation=activation, norm=norm), device=device)
    if loop:
        for moe in model.moe_layers():
            moe.experts.dispatch = "loop"
    return model


def build_hf_llama(preset: str, device: torch.device, seed: int) -> nn.Module | None:
    """The same-shape ``LlamaForCausalLM`` (None when transformers is missing or the preset is MoE)."""
    from steadylm.models import ModelConfig

    cfg = ModelConfig.from_preset(preset)
    if cfg.n_experts:
        return None
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    from steadylm.integrations.transformers.convert import plain_hf_config

    torch.manual_seed(seed)
    hf_config = plain_hf_config(cfg, "LlamaForCausalLM")
    hf_config._attn_implementation = "sdpa"  # HF's default on CPU too; stated, not left to chance
    return LlamaForCausalLM(hf_config).to(device)


def _generate_call(model: nn.Module, mode: str, prompt: Tensor, new: int, device: torch.device, dtype: str) -> Callable[[], None]:
    if hasattr(model, "new_kv_cache"):  # a steadylm model

        def call() -> None:
            with _autocast(device, dtype):
                model.generate(prompt, new, temperature=0.0, decode=mode)

    else:  # Hugging Face: its default generate (dynamic cache), greedy, exactly `new` tokens

        def call() -> None:
            with torch.no_grad(), _autocast(device, dtype):
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0)  # fmt: skip

    return call


# --------------------------------------------------------------------------------------------
# profiler: share of the step in norms and activations
# --------------------------------------------------------------------------------------------

# Backward of the ops, by category: the fused ops' backward custom ops (steadylm::<op>_backward,
# inside the autograd node's evaluate_function range, which is not counted) and LayerNorm's node.
_BACKWARD_NODES = {"norm": ("NativeLayerNormBackward",), "activation": ()}


def _backward_ops(category: str) -> set[str]:
    from steadylm.bench.step_profile import OP_CATEGORY

    cats = {"norm": ("norm", "statistic"), "activation": ("activation",)}[category]
    return {f"steadylm::{op}_backward" for op, cat in OP_CATEGORY.items() if cat in cats}


@contextlib.contextmanager
def _labelled_modules(model: nn.Module) -> Iterator[None]:
    """``record_function`` ranges ``steadylm.norm`` / ``steadylm.activation`` around those modules."""
    from torch.autograd.profiler import record_function

    from steadylm.nn import BHyT, DyT, LayerNorm, RMSNorm
    from steadylm.nn.activations import Activation

    categories = {"norm": (RMSNorm, LayerNorm, DyT, BHyT), "activation": (Activation,)}
    handles = []
    for module in model.modules():
        for category, types in categories.items():
            if isinstance(module, types):
                ranges: list[Any] = []

                def pre(mod: nn.Module, args: Any, _c: str = category, _r: list[Any] = ranges) -> None:
                    _r.append(record_function(f"steadylm.{_c}").__enter__())

                def post(mod: nn.Module, args: Any, out: Any, _r: list[Any] = ranges) -> None:
                    _r.pop().__exit__(None, None, None)

                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile_shares(model: nn.Module, step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Fractions of one training step (wall time on CPU, device time on CUDA) in norms and activations."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _labelled_modules(model):
        step()  # warm (hooks change nothing in the math)
        with profile(activities=activities) as prof:
            with record_function("steadylm.step"):
                step()
            synchronize(device)
    use_device = device.type == "cuda"
    totals: dict[str, float] = {"norm": 0.0, "activation": 0.0, "step": 0.0}
    for event in prof.key_averages():
        value = float(event.device_time_total if use_device else event.cpu_time_total)
        name = event.key
        if name == "steadylm.step":
            totals["step"] = value
        for category in ("norm", "activation"):
            # The engine's evaluate_function range encloses the node's own range: count it once.
            if name == f"steadylm.{category}" or name in _backward_ops(category) or name in {
                f"autograd::engine::evaluate_function: {node}" for node in _BACKWARD_NODES[category]
            }:
                totals[category] += value
    if use_device:
        # Device time of the whole step: every kernel, not only those under the step range.
        totals["step"] = float(sum(e.self_device_time_total for e in prof.key_averages()))
    step_time = totals["step"] or float("nan")
    return {"norm": totals["norm"] / step_time, "activation": totals["activation"] / step_time}


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class ModelBenchResult:
    rows: list[Row]
    shares: dict[tuple[str, str], dict[str, float]]  # (preset, variant) -> {"norm": f, "activation": f}
    device: str
    config: ModelBenchConfig
    peaks: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (preset, variant, mode) -> bytes

    def peak_ratio_vs_hf(self, preset: str, variant: str, mode: str) -> float | None:
        """Peak training memory of a row over ``hf-llama``'s in the same preset and mode (None: no HF peak)."""
        peak, hf = self.peaks.get((preset, variant, mode)), self.peaks.get((preset, HF_VARIANT, mode))
        return peak / hf if peak is not None and hf else None


def run_model_bench(config: ModelBenchConfig, progress: Callable[[str], None] | None = None) -> ModelBenchResult:
    """Build every row, warm it up (compiles), time interleaved rounds, compute paired ratios."""
    config.validate()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = progress or (lambda _m: None)
    # Every variant × mode compiles its own graphs; the default limit (8 per code object) would
    # send later variants back to eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    gen = torch.Generator().manual_seed(config.seed)
    calls: dict[tuple[str, str, str, str], Callable[[], None]] = {}
    rows: list[Row] = []
    shares: dict[tuple[str, str], dict[str, float]] = {}
    peaks: dict[tuple[str, str, str], int] = {}
    optimizers: dict[tuple[str, str, str, str], tuple[nn.Module, torch.optim.Optimizer]] = {}
    keep: list[nn.Module] = []
    for preset in config.presets:
        from steadylm.models import ModelConfig

        vocab = ModelConfig.from_preset(preset).vocab_size
        train_tokens = torch.randint(0, vocab, (config.batch, config.seq + 1), generator=gen).to(device)
        prompts = {b: torch.randint(0, vocab, (b, config.prompt), generator=gen).to(device) for b in config.gen_batches}
        entries: list[tuple[str, nn.Module | None]] = [(v, None) for v in config.variants()]
        if config.moe_loop and ModelConfig.from_preset(preset).n_experts:
            entries.insert(1, (BASELINE + LOOP_SUFFIX, None))
        if config.hf:
            hf = build_hf_llama(preset, device, config.seed)
            if hf is not None:
                entries.append((HF_VARIANT, hf))
                from steadylm.bench.hf_generate import HF_STEADYLM, build_hf_steadylm, hf_steadylm_variants

                for v in hf_steadylm_variants(config.variants(), BASELINE):  # the steadylm HF type
                    hf_steadylm = build_hf_steadylm(preset, v, device, config.seed)
                    if hf_steadylm is not None:
                        entries.append((f"{HF_STEADYLM}:{v}", hf_steadylm))
        for variant, hf_model in entries:
            for mode in config.modes:
                # Separate model instances per mode: compiling one must not change the other.
                model = hf_model if hf_model is not None else _build(preset, variant, device, config.seed)
                keep.append(model)
                say(f"[{preset}] {variant} {mode}: building and warming up")
                train_key = (preset, variant, mode, "train")
                train_step_fn, optimizer = train_step(model, mode == "compiled", train_tokens, device, config.dtype)
                if "train" in config.measures and not variant.startswith("hf-steadylm:"):  # generation rows
                    calls[train_key] = train_step_fn
                    optimizers[train_key] = (model, optimizer)
                    rows.append(Row(*train_key, tokens_per_call=config.batch * config.seq))
                if "generate" in config.measures and (hf_model is None or mode == "eager"):
                    # HF generate: its default (eager) path only
                    for b in config.gen_batches:
                        key = (preset, variant, mode, f"generate-b{b}")
                        calls[key] = _generate_call(model, mode, prompts[b], config.new_tokens, device, config.dtype)
                        rows.append(Row(*key, tokens_per_call=b * config.new_tokens))
                if config.profile and mode == "eager" and hf_model is None:
                    shares[(preset, variant)] = profile_shares(model, train_step_fn, device)
        for row in rows:
            if row.preset == preset:
                for _ in range(config.warmup + 1):  # the first call compiles
                    calls[row.key]()
                synchronize(device)
        if config.memory:  # after warm-up (optimizer state exists), outside the timed rounds
            for row in rows:
                if row.preset == preset and row.measure == "train":
                    say(f"[{preset}] {row.variant} {row.mode}: peak memory of one training step")
                    model, optimizer = optimizers[row.key]
                    peaks[(preset, row.variant, row.mode)] = train_peak_bytes(calls[row.key], model, optimizer, device)
    say(f"timing {config.rounds} interleaved rounds of {len(rows)} rows")
    for r in range(config.rounds):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            row.times_s.append(time_call(calls[row.key], device))
    by_key = {row.key: row for row in rows}
    for row in rows:
        base_mode = row.mode if (row.preset, BASELINE, row.mode, row.measure) in by_key else "eager"
        base = by_key.get((row.preset, BASELINE, base_mode, row.measure))
        if base is not None:
            row.ratios = [b / t for b, t in zip(base.times_s, row.times_s)]
    return ModelBenchResult(rows, shares, str(device), config, peaks)


def paired_ratio(result: ModelBenchResult, a: tuple[str, str, str, str], b: tuple[str, str, str, str]) -> list[float] | None:
    """Per-round throughput ratio of row ``a`` over row ``b`` (same rounds), or None if either is missing."""
    rows = {row.key: row for row in result.rows}
    if a not in rows or b not in rows:
        return None
    return [tb / ta for ta, tb in zip(rows[a].times_s, rows[b].times_s)]


def comparisons(result: ModelBenchResult) -> list[tuple[str, list[float]]]:
    """The issue's headline comparisons this run can make: (description, per-round ratios)."""
    out: list[tuple[str, list[float]]] = []
    for preset in result.config.presets:
        for b in result.config.gen_batches:
            m = f"generate-b{b}"
            for mode in result.config.modes:
                r = paired_ratio(result, (preset, BASELINE, mode, m), (preset, HF_VARIANT, "eager", m))
                if r:
                    out.append((f"[{preset}] {m}: steadylm {BASELINE} {mode} / HF generate", r))
        r = paired_ratio(result, (preset, BASELINE, "compiled", "train"), (preset, HF_VARIANT, "compiled", "train"))
        if r:
            out.append((f"[{preset}] train: steadylm {BASELINE} compiled / HF Llama compiled", r))
        for variant in ("swiglu+bhyt", "powlu+rmsnorm", BASELINE + LOOP_SUFFIX):
            for mode in result.config.modes:
                for m in ["train"] + [f"generate-b{b}" for b in result.config.gen_batches]:
                    r = paired_ratio(result, (preset, variant, mode, m), (preset, BASELINE, mode, m))
                    if r:
                        out.append((f"[{preset}] {m} {mode}: {variant} / {BASELINE}", r))
    from steadylm.bench.hf_generate import hf_generate_comparisons

    return out + hf_generate_comparisons(result, paired_ratio, HF_VARIANT)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def csv_rows(result: ModelBenchResult, timestamp: str | None = None) -> list[dict[str, str]]:
    """Rows in the ``bench ops`` CSV columns: kernel = variant, provider = mode, mode = measurement."""
    from steadylm.bench.ops import CSV_COLUMNS

    stamp = timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds")
    version = f"steadylm-{steadylm.__version__}/torch-{torch.__version__}"
    cfg = result.config

    def row(preset: str, variant: str, mode: str, measure: str, metric: str, unit: str,
            values: Sequence[float]) -> dict[str, str]:  # fmt: skip
        shape = f"{preset}:train{cfg.batch}x{cfg.seq}:gen{cfg.prompt}+{cfg.new_tokens}:{cfg.dtype}"
        d = {"kernel": variant, "provider": mode, "mode": measure, "metric": metric, "unit": unit,
             "shape": shape, "median": f"{statistics.median(values):.6g}", "p20": f"{quantile(values, 0.2):.6g}",
             "p80": f"{quantile(values, 0.8):.6g}", "device": result.device, "timestamp": stamp,
             "version": version}  # fmt: skip
        assert tuple(d) == CSV_COLUMNS
        return d

    out = []
    for r in result.rows:
        out.append(row(r.preset, r.variant, r.mode, r.measure, "throughput", "tokens/s", r.tokens_per_s()))
        if r.ratios:
            out.append(row(r.preset, r.variant, r.mode, r.measure, "ratio_vs_baseline", "x", r.ratios))
    for (preset, variant), share in result.shares.items():
        for category, value in share.items():
            out.append(row(preset, variant, "eager", "train", f"{category}_share", "fraction", [value]))
    for (preset, variant, mode), peak in result.peaks.items():
        out.append(row(preset, variant, mode, "train", "peak_memory", "MiB", [peak / 2**20]))
        ratio = result.peak_ratio_vs_hf(preset, variant, mode)
        if ratio is not None:
            out.append(row(preset, variant, mode, "train", "peak_memory_ratio_vs_hf", "x", [ratio]))
    return out


def table_cells(result: ModelBenchResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the result table (one row per preset, variant, mode)."""
    cfg = result.config
    measures = (["train"] if "train" in cfg.measures else []) + (
        [f"generate-b{b}" for b in cfg.gen_batches] if "generate" in cfg.measures else []
    )
    header = ["preset", "variant", "mode"]
    for m in measures:
        header += [f"{m} tok/s", f"{m} ratio"]
    header += ["norm % (eager step)", "act % (eager step)"]
    if result.peaks:
        header += ["train peak MiB", "peak / HF"]
    by_key = {r.key: r for r in result.rows}
    seen: list[tuple[str, str, str]] = []
    for r in result.rows:
        if (r.preset, r.variant, r.mode) not in seen:
            seen.append((r.preset, r.variant, r.mode))
    body = []
    for preset, variant, mode in seen:
        cells = [preset, variant, mode]
        for m in measures:
            r = by_key.get((preset, variant, mode, m))
            if r is None:
                cells += ["", ""]
                continue
            cells.append(f"{statistics.median(r.tokens_per_s()):,.0f}")
            cells.append(
                f"{statistics.median(r.ratios):.3f} [{quantile(r.ratios, 0.2):.3f}–{quantile(r.ratios, 0.8):.3f}]"
                if r.ratios else ""
            )
        share = result.shares.get((preset, variant)) if mode == "eager" else None
        cells += [f"{100 * share['norm']:.1f}", f"{100 * share['activation']:.1f}"] if share else ["", ""]
        if result.peaks:
            peak = result.peaks.get((preset, variant, mode))
            ratio = result.peak_ratio_vs_hf(preset, variant, mode)
            cells += ["" if peak is None else f"{peak / 2**20:.1f}", "" if ratio is None else f"{ratio:.3f}"]
        body.append(cells)
    return header, body


def title(result: ModelBenchResult) -> str:
    cfg = result.config
    return (
        f"steadylm bench model — train {cfg.batch}×{cfg.seq}, generate {cfg.prompt}+{cfg.new_tokens} "
        f"({cfg.dtype}, {result.device}; ratio = paired throughput vs {BASELINE} in the same mode, "
        f"median [p20–p80] over {cfg.rounds} interleaved rounds)"
    )


#: Under the table when it has the peak memory column.
PEAK_NOTE = (
    "train peak MiB: one training step, measured once after warm-up outside the timed rounds — parameters, "
    "buffers and AdamW state plus the most the step holds above them ({how}); peak / HF: over hf-llama's "
    "peak in the same mode."
)


def peak_note(result: ModelBenchResult) -> str:
    how = ("torch.cuda.max_memory_allocated" if result.device.startswith("cuda")
           else "the profiler's allocation and free events")  # fmt: skip
    return PEAK_NOTE.format(how=how)


def render_table(result: ModelBenchResult) -> Any:
    """A rich Table of :func:`table_cells`."""
    from rich.markup import escape
    from rich.table import Table

    # escape: rich reads "[p20–p80]" or "[nano]" as markup tags and drops them
    header, body = table_cells(result)
    table = Table(title=escape(title(result)), caption=escape(peak_note(result)) if result.peaks else None)
    for i, col in enumerate(header):
        table.add_column(escape(col), justify="left" if i < 3 else "right")
    for cells in body:
        table.add_row(*(escape(c) for c in cells))
    return table


def render_markdown(result: ModelBenchResult) -> str:
    """The table and the headline comparisons as markdown."""
    header, body = table_cells(result)
    lines = [f"### {title(result)}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if result.peaks:
        lines += ["", peak_note(result)]
    lines += ["", "| comparison (throughput ratio) | median | p20–p80 | 95% interval of the median |",
              "|---|---:|---:|---:|"]  # fmt: skip
    for description, ratios in comparisons(result):
        interval = median_interval(ratios)
        shown = f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "too few rounds"
        lines.append(
            f"| {description} | {statistics.median(ratios):.3f} | {quantile(ratios, 0.2):.3f}–{quantile(ratios, 0.8):.3f} "
            f"| {shown} |"
        )
    return "\n".join(lines) + "\n"
