"""``steadylm bench ops``: fused kernels vs eager reference vs ``torch.compile`` of the reference.

For every op × dtype × mode (forward, backward, forward+backward) and provider (``eager`` =
:mod:`steadylm.functional`, ``compile`` = ``torch.compile`` of it, ``fused`` =
:mod:`steadylm.kernels`, and on CUDA with Liger-Kernel installed ``liger`` for RMSNorm, SwiGLU and
DyT) this measures

* time: median, p20 and p80 of ``repeats`` runs after warm-up (on CUDA each run is the mean of
  ``cuda_calls`` calls back to back, so that host work overlaps device work and the time is the
  device's). Providers are interleaved run by run
  (round-robin, rotating the order), so that a noisy neighbour slows all of them alike instead of
  whichever happened to run during the noise;
* effective bandwidth: the op's minimal memory traffic (every input read once, every output written
  once) divided by the time, and that as a percentage of the machine's copy bandwidth, measured in
  the same run on a tensor of the same size (``dst.copy_(src)`` into a preallocated ``dst``);
* peak memory: the largest amount of memory the call held above what existed before it
  (:func:`steadylm.bench.memory.peak_bytes`; CPU: from the profiler's allocation events, which
  include Inductor's buffers; CUDA: the allocator's peak).

Forward runs with inputs that require grad (a training forward: the eager reference builds its
graph and keeps its intermediates, the compiled reference saves what its backward needs).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import steadylm
from steadylm import functional as ref
from steadylm import kernels as fused
from steadylm.bench import memory, timing
from steadylm.config_fields import spec_field
from steadylm.errors import ConfigError

__all__ = [
    "CSV_COLUMNS",
    "DTYPES",
    "MODES",
    "OPS",
    "PROVIDERS",
    "BenchConfig",
    "Measurement",
    "append_csv",
    "run_bench",
]

CSV_COLUMNS: tuple[str, ...] = (
    "kernel", "provider", "mode", "metric", "unit", "shape",
    "median", "p20", "p80", "device", "timestamp", "version",
)  # fmt: skip
MODES: tuple[str, ...] = ("forward", "backward", "forward+backward")
PROVIDERS: tuple[str, ...] = ("eager", "compile", "fused")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class OpSpec:
    """How to benchmark one op: its inputs, both implementations, and its minimal traffic."""

    name: str
    reference: Callable[..., Tensor]
    fused: Callable[..., Tensor]
    # (tokens, hidden, dtype, device, generator) -> positional args
    make_args: Callable[[int, int, torch.dtype, torch.device, torch.Generator], tuple[Any, ...]]
    # big [tokens, hidden] tensors read by forward (written: one output of the same size)
    forward_reads: int
    # big tensors written by backward (gradients of the big inputs)
    backward_writes: int

    def traffic_bytes(self, mode: str, numel: int, element_size: int) -> int:
        """Minimal bytes moved: each big input read once, each big output written once."""
        big = numel * element_size
        forward = (self.forward_reads + 1) * big
        # backward reads the saved inputs and the output gradient, writes the input gradients
        backward = (self.forward_reads + 1 + self.backward_writes) * big
        return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def _randn(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensor:
    return torch.randn(tokens, hidden, generator=gen, device="cpu").to(device=device, dtype=dtype)


def _param(values: Tensor, device: torch.device) -> Tensor:
    # Parameters stay fp32 (mixed-precision training keeps fp32 master weights; the ops upcast).
    return values.to(device=device, dtype=torch.float32)


def _gated_args(t: int, h: int, dt: torch.dtype, dev: torch.device, gen: torch.Generator) -> tuple[Any, ...]:
    return (_randn(t, h, dt, dev, gen) * 3.0, _randn(t, h, dt, dev, gen))


def _norm_weight(h: int, dev: torch.device, gen: torch.Generator) -> Tensor:
    return _param(1.0 + 0.1 * torch.randn(h, generator=gen), dev)


OPS: dict[str, OpSpec] = {
    "swiglu": OpSpec("swiglu", ref.swiglu, fused.swiglu, _gated_args, 2, 2),
    "powlu_glu": OpSpec("powlu_glu", ref.powlu_glu, fused.powlu_glu, _gated_args, 2, 2),
    "swiglu_clip": OpSpec("swiglu_clip", ref.swiglu_clip, fused.swiglu_clip, _gated_args, 2, 2),
    "rms_norm": OpSpec(
        "rms_norm", ref.rms_norm, fused.rms_norm,
        lambda t, h, dt, dev, gen: (_randn(t, h, dt, dev, gen), _norm_weight(h, dev, gen)),
        1, 1,
    ),
    "dyt": OpSpec(
        "dyt", ref.dyt, fused.dyt,
        lambda t, h, dt, dev, gen: (
            _randn(t, h, dt, dev, gen), _norm_weight(h, dev, gen), _param(torch.tensor(0.5), dev)
        ),
        1, 1,
    ),
    "bhyt": OpSpec(
        "bhyt", ref.bhyt, fused.bhyt,
        lambda t, h, dt, dev, gen: (
            _randn(t, h, dt, dev, gen), _norm_weight(h, dev, gen), _param(torch.tensor(2.0), dev)
        ),
        1, 1,
    ),
}  # fmt: skip
NORM_OPS: tuple[str, ...] = ("rms_norm", "dyt", "bhyt")


def _liger_ops() -> dict[str, Callable[..., Tensor]]:
    """Liger-Kernel's RMSNorm, SwiGLU and DyT behind our ops' argument lists (empty if not installed).

    Peer rows of ``bench ops`` on CUDA (Liger is Triton-only). ``in_place=False``: Liger's RMSNorm
    would otherwise overwrite the output gradient, which the benchmark reuses between runs.
    """
    try:
        from liger_kernel.transformers.functional import liger_dyt, liger_rms_norm, liger_swiglu
    except ImportError:
        return {}
    return {
        "rms_norm": lambda x, w: liger_rms_norm(x, w, 1e-6, in_place=False),
        "swiglu": liger_swiglu,
        "dyt": lambda x, w, alpha: liger_dyt(x, alpha.reshape(1), w, torch.zeros_like(w)),
    }


@dataclass
class BenchConfig:
    """What to run. ``repeats`` timed runs per provider after ``warmup`` untimed ones."""

    ops: Sequence[str] = spec_field(tuple(OPS), help="ops to time", flag="--ops")
    dtypes: Sequence[str] = spec_field(("fp32", "bf16"), help="dtypes: fp32,bf16,fp16", flag="--dtypes")
    modes: Sequence[str] = spec_field(MODES, help="forward,backward,forward+backward", flag="--modes")
    providers: Sequence[str] = spec_field(PROVIDERS, help="eager,compile,fused", flag="--providers")
    tokens: int = spec_field(8192, help="rows (tokens)", flag="--tokens")
    hidden: int = spec_field(4096, help="hidden size", flag="--hidden")
    repeats: int = spec_field(10, help="timed runs per provider", flag="--repeats")
    warmup: int = spec_field(2, help="untimed runs before timing", flag="--warmup")
    memory: bool = spec_field(True, help="measure peak memory", flag="--memory")
    device: str | None = spec_field(None, help="cpu or cuda (None: cuda when available)", flag="--device")
    seed: int = 0
    liger: bool = spec_field(True, help="add Liger-Kernel peer rows (provider 'liger', CUDA, when installed)",
                             flag="--liger")
    cuda_calls: int = spec_field(10, help="CUDA: calls back to back per timed run (host work overlapped; "
                                 "1: each call synchronised on its own)", flag="--cuda-calls")

    def validate(self) -> None:
        def check_subset(field: str, values: Sequence[str], allowed: Sequence[str]) -> None:
            if not values:
                raise ConfigError(f"{field} must name at least one of {list(allowed)}")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ConfigError(f"{field}: unknown {unknown}; allowed: {list(allowed)}")

        check_subset("ops", self.ops, list(OPS))
        check_subset("dtypes", self.dtypes, list(DTYPES))
        check_subset("modes", self.modes, MODES)
        check_subset("providers", self.providers, PROVIDERS)
        for field, value, low in (("tokens", self.tokens, 1), ("hidden", self.hidden, 1),
                                  ("repeats", self.repeats, 1), ("warmup", self.warmup, 0),
                                  ("cuda_calls", self.cuda_calls, 1)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{field} must be an integer >= {low}, got {value!r}")
        if self.hidden > 16384 and any(op in NORM_OPS for op in self.ops):
            raise ConfigError(f"hidden must be <= 16384 for the norm kernels, got {self.hidden}")


@dataclass
class Measurement:
    """One row of results (one CSV row per metric)."""

    kernel: str
    provider: str
    mode: str
    dtype: str
    times_s: list[float]
    traffic_bytes: int
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def quantile_s(self, q: float) -> float:
        return timing.quantile(self.times_s, q)

    def bandwidth_gbs(self, seconds: float) -> float:
        return self.traffic_bytes / seconds / 1e9


# --------------------------------------------------------------------------------------------
# timing (peak memory: steadylm.bench.memory)
# --------------------------------------------------------------------------------------------


def _interleaved_times(
    runners: dict[str, Callable[[], Any]], repeats: int, device: torch.device, calls: int = 1
) -> dict[str, list[float]]:
    """``repeats`` timings per runner, round-robin with a rotating start; each the mean of ``calls``
    back-to-back calls (:func:`steadylm.bench.timing.time_call`)."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timing.time_call(runners[name], device, calls))
    return times


def measure_copy(
    numel: int, dtype: torch.dtype, device: torch.device, repeats: int, warmup: int, calls: int = 1
) -> dict[str, list[float]]:
    """Timings (s) of ``dst.copy_(src)`` (preallocated) and of ``src.clone()`` (allocating)."""
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    runners = {"copy_": lambda: dst.copy_(src), "clone": lambda: src.clone()}
    for _ in range(warmup + 1):
        for fn in runners.values():
            fn()
    return _interleaved_times(runners, repeats, device, calls)


def copy_bandwidth_gbs(copies: dict[str, dict[str, list[float]]], dtype: str, numel: int) -> float:
    """The copy roofline: bytes read + written by ``copy_`` over its median time."""
    element_size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return 2 * numel * element_size / statistics.median(copies[dtype]["copy_"]) / 1e9


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def _make_runner(
    fn: Callable[..., Tensor], args: tuple[Any, ...], mode: str, grad_out: Tensor
) -> Callable[[], Any]:
    diff = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
    if mode == "forward":
        return lambda: fn(*args)
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(fn(*args), diff, grad_out)
    # backward: one forward outside the timer, then repeated backwards through the kept graph.
    out = fn(*args)
    return lambda: torch.autograd.grad(out, diff, grad_out, retain_graph=True)


def _provider_fn(spec: OpSpec, provider: str) -> Callable[..., Tensor]:
    if provider == "eager":
        return spec.reference
    if provider == "fused":
        return spec.fused
    # A fresh compile of the reference, static shapes: the best case for torch.compile.
    return torch.compile(spec.reference, dynamic=False)


def run_bench(
    config: BenchConfig, progress: Callable[[str], None] | None = None
) -> tuple[list[Measurement], dict[str, dict[str, list[float]]]]:
    """Run the benchmark; return the measurements and, per dtype, the copy timings (seconds)."""
    config.validate()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = progress or (lambda _msg: None)
    numel = config.tokens * config.hidden
    results: list[Measurement] = []
    copies: dict[str, dict[str, list[float]]] = {}
    liger = _liger_ops() if (config.liger and device.type == "cuda") else {}
    # On CUDA the calls of a timed run go back to back (the roofline is about device time; the host
    # cost per call is python -m steadylm.bench.call_overhead's). On CPU host and device are one.
    calls = config.cuda_calls if device.type == "cuda" else 1
    for dtype_name in config.dtypes:
        dtype = DTYPES[dtype_name]
        copy = measure_copy(numel, dtype, device, config.repeats, config.warmup, calls)
        copies[dtype_name] = copy
        element_size = torch.empty((), dtype=dtype).element_size()
        clone_gbs = 2 * numel * element_size / statistics.median(copy["clone"]) / 1e9
        say(
            f"[{dtype_name}] copy bandwidth {copy_bandwidth_gbs(copies, dtype_name, numel):.1f} GB/s "
            f"(copy_ into preallocated); clone (allocating) {clone_gbs:.1f} GB/s"
        )
        for op_name in config.ops:
            spec = OPS[op_name]
            gen = torch.Generator().manual_seed(config.seed)
            base_args = spec.make_args(config.tokens, config.hidden, dtype, device, gen)
            args = tuple(a.requires_grad_(True) if isinstance(a, Tensor) else a for a in base_args)
            grad_out = _randn(config.tokens, config.hidden, dtype, device, gen)
            fns = {p: _provider_fn(spec, p) for p in config.providers}
            if op_name in liger:
                fns["liger"] = liger[op_name]
            providers = list(fns)
            for mode in config.modes:
                say(f"[{dtype_name}] {op_name} {mode}")
                runners = {p: _make_runner(fns[p], args, mode, grad_out) for p in providers}
                for _ in range(config.warmup + 1):  # the first call compiles
                    for fn in runners.values():
                        timing.time_call(fn, device)
                times = _interleaved_times(runners, config.repeats, device, calls)
                for provider in providers:
                    peak = memory.peak_bytes(runners[provider], device) if config.memory else None
                    results.append(
                        Measurement(
                            kernel=op_name,
                            provider=provider,
                            mode=mode,
                            dtype=dtype_name,
                            times_s=times[provider],
                            traffic_bytes=spec.traffic_bytes(mode, numel, element_size),
                            peak_bytes=peak,
                        )
                    )
                del runners
    return results, copies


# --------------------------------------------------------------------------------------------
# output: CSV rows, table, target check
# --------------------------------------------------------------------------------------------


def csv_rows(
    results: Sequence[Measurement],
    copies: dict[str, dict[str, list[float]]],
    config: BenchConfig,
    device: str,
    timestamp: str | None = None,
) -> list[dict[str, str]]:
    """One CSV row per (measurement, metric); the dtype is part of the shape field (``TxH:dtype``)."""
    stamp = timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds")
    version = f"steadylm-{steadylm.__version__}/torch-{torch.__version__}"
    numel = config.tokens * config.hidden

    def row(kernel: str, provider: str, mode: str, metric: str, unit: str, dtype: str,
            med: float, p20: float, p80: float) -> dict[str, str]:  # fmt: skip
        return {
            "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "shape": f"{config.tokens}x{config.hidden}:{dtype}",
            "median": f"{med:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}",
            "device": device, "timestamp": stamp, "version": version,
        }  # fmt: skip

    rows: list[dict[str, str]] = []
    for dtype_name, copy in copies.items():
        element_size = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
        for name in ("copy_", "clone"):
            ts = Measurement(name, "torch", name, dtype_name, list(copy[name]), 2 * numel * element_size)
            rows.append(row("copy", "torch", name, "time", "ms", dtype_name,
                            ts.median_s * 1e3, ts.quantile_s(0.2) * 1e3, ts.quantile_s(0.8) * 1e3))  # fmt: skip
            rows.append(row("copy", "torch", name, "bandwidth", "GB/s", dtype_name,
                            ts.bandwidth_gbs(ts.median_s), ts.bandwidth_gbs(ts.quantile_s(0.8)),
                            ts.bandwidth_gbs(ts.quantile_s(0.2))))  # fmt: skip
    for m in results:
        copy_gbs = copy_bandwidth_gbs(copies, m.dtype, numel)
        med, p20, p80 = m.median_s, m.quantile_s(0.2), m.quantile_s(0.8)
        rows.append(row(m.kernel, m.provider, m.mode, "time", "ms", m.dtype, med * 1e3, p20 * 1e3, p80 * 1e3))
        # the 20th percentile of bandwidth comes from the 80th percentile of time, and vice versa
        bw = (m.bandwidth_gbs(med), m.bandwidth_gbs(p80), m.bandwidth_gbs(p20))
        rows.append(row(m.kernel, m.provider, m.mode, "bandwidth", "GB/s", m.dtype, *bw))
        rows.append(row(m.kernel, m.provider, m.mode, "roofline", "% of copy", m.dtype,
                        *(100.0 * b / copy_gbs for b in bw)))  # fmt: skip
        if m.peak_bytes is not None:
            mib = m.peak_bytes / 2**20
            rows.append(row(m.kernel, m.provider, m.mode, "peak_memory", "MiB", m.dtype, mib, mib, mib))
    return rows


def append_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, str]]) -> None:
    """Append rows to a CSV of :data:`CSV_COLUMNS` (:func:`steadylm.bench.timing.append_csv`)."""
    timing.append_csv(path, rows, CSV_COLUMNS)


def _find(results: Sequence[Measurement], kernel: str, provider: str, mode: str, dtype: str) -> Measurement | None:
    for m in results:
        if (m.kernel, m.provider, m.mode, m.dtype) == (kernel, provider, mode, dtype):
            return m
    return None


def check_targets(
    results: Sequence[Measurement], copies: dict[str, dict[str, list[float]]], config: BenchConfig
) -> list[tuple[str, bool, str]]:
    """The issue's targets that this run can judge: (description, met, measured)."""
    checks: list[tuple[str, bool, str]] = []
    numel = config.tokens * config.hidden
    for dtype in config.dtypes:
        copy_gbs = copy_bandwidth_gbs(copies, dtype, numel)
        fb = "forward+backward"
        pf, pe, pc = (_find(results, "powlu_glu", p, fb, dtype) for p in ("fused", "eager", "compile"))
        if pf and pe:
            ratio = pe.median_s / pf.median_s
            checks.append((f"[{dtype}] powlu_glu fwd+bwd fused >= 5x eager", ratio >= 5.0, f"{ratio:.2f}x"))
        for op in config.ops:
            for mode in config.modes:
                f, c = _find(results, op, "fused", mode, dtype), _find(results, op, "compile", mode, dtype)
                if f and c:
                    ratio = c.median_s / f.median_s
                    checks.append(
                        (f"[{dtype}] {op} {mode}: fused not slower than compile", ratio >= 1.0, f"{ratio:.2f}x")
                    )
            f = _find(results, op, "fused", "forward", dtype)
            if op in NORM_OPS and f:
                pct = 100.0 * f.bandwidth_gbs(f.median_s) / copy_gbs
                checks.append((f"[{dtype}] {op} fused forward >= 50% of copy bandwidth", pct >= 50.0, f"{pct:.0f}%"))
            f, e = _find(results, op, "fused", fb, dtype), _find(results, op, "eager", fb, dtype)
            if f and e and f.peak_bytes is not None and e.peak_bytes is not None:
                checks.append(
                    (
                        f"[{dtype}] {op} fwd+bwd peak memory fused <= eager",
                        f.peak_bytes <= e.peak_bytes,
                        f"{f.peak_bytes / 2**20:.0f} vs {e.peak_bytes / 2**20:.0f} MiB",
                    )
                )
    return checks


def render_table(results: Sequence[Measurement], copies: dict[str, dict[str, list[float]]], config: BenchConfig) -> Any:
    """A rich Table: one line per (dtype, op, mode, provider)."""
    from rich.table import Table

    table = Table(title=f"steadylm bench ops — {config.tokens}×{config.hidden}", show_lines=False)
    for col, justify in (("dtype", "left"), ("op", "left"), ("mode", "left"), ("provider", "left"),
                         ("median ms", "right"), ("p20–p80 ms", "right"), ("GB/s", "right"),
                         ("% copy", "right"), ("peak MiB", "right"), ("vs eager", "right"),
                         ("vs compile", "right")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    numel = config.tokens * config.hidden
    previous_group = None
    for m in results:
        copy_gbs = copy_bandwidth_gbs(copies, m.dtype, numel)
        eager = _find(results, m.kernel, "eager", m.mode, m.dtype)
        comp = _find(results, m.kernel, "compile", m.mode, m.dtype)
        group = (m.dtype, m.kernel, m.mode)
        if previous_group is not None and group[:2] != previous_group[:2]:
            table.add_section()
        previous_group = group
        bw = m.bandwidth_gbs(m.median_s)
        table.add_row(
            m.dtype,
            m.kernel,
            m.mode,
            m.provider,
            f"{m.median_s * 1e3:.2f}",
            f"{m.quantile_s(0.2) * 1e3:.2f}–{m.quantile_s(0.8) * 1e3:.2f}",
            f"{bw:.1f}",
            f"{100 * bw / copy_gbs:.0f}%",
            "" if m.peak_bytes is None else f"{m.peak_bytes / 2**20:.0f}",
            "" if eager is None else f"{eager.median_s / m.median_s:.2f}×",
            "" if comp is None else f"{comp.median_s / m.median_s:.2f}×",
        )
    return table
