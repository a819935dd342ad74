"""The one summary of a lab run: loss, spikes, divergence, outliers, FP8 counters, and "dead".

:func:`summarize` turns a run's metric rows into a :class:`RunSummary`; every protocol's tables,
findings and ``summary.json`` read these fields, so each verdict has one definition:

* **spike** — a step whose loss has a rolling z-score above ``probes.spike_threshold`` against the
  preceding ``probes.spike_window`` losses (:func:`steadylm.probes.detect_spikes`).
* **divergence** and **excursion** — :func:`steadylm.probes.spikes.classify_run`, the one rule
  (:data:`~steadylm.probes.spikes.DIVERGENCE_RULE`, :data:`~steadylm.probes.spikes.EXCURSION_RULE`);
  a run the trainer stopped on a non-finite loss or gradient norm keeps the trainer's reason.
* **dead** — the variant does not train, for a reason a bad learning rate or recipe produces and a
  loss curve alone hides: its gradients vanish (the largest gate/up-projection gradient of some
  layer at the last probe is below :data:`DEAD_GRAD_AMAX`, or the global gradient norm of the last
  steps is below :data:`DEAD_GRAD_NORM`), or a tanh site saturates (more than
  :data:`DEAD_SATURATION` of |tanh| above 0.95 at the last probe).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steadylm.probes import detect_spikes, pearson_r
from steadylm.probes import keys as K
from steadylm.probes.spikes import ENDING_WINDOW, classify_run

__all__ = [
    "DEAD_GRAD_AMAX",
    "DEAD_GRAD_NORM",
    "DEAD_SATURATION",
    "RunSummary",
    "dead_reason",
    "pick_lr",
    "status",
    "summarize",
]

#: A layer whose largest |∂L/∂(W_gate x)| and |∂L/∂(W_up x)| are both below this at the last probe
#: receives no learning signal (fp32 gradients of a live 1M-parameter model are ~1e-6 and up).
DEAD_GRAD_AMAX = 1e-12
#: A global gradient norm (median of the last 10 steps) below this: the whole model gets none.
DEAD_GRAD_NORM = 1e-8
#: Share of |tanh| > 0.95 at one site beyond which the norm has become a sign function.
DEAD_SATURATION = 0.5
#: Losses averaged for the final loss (the window the divergence rule reads).
TAIL = ENDING_WINDOW


@dataclass
class RunSummary:
    """Headline numbers of one run (NaN where the run has no such measurement)."""

    variant: str
    activation: str
    norm: str
    steps_logged: int = 0
    start_loss: float = math.nan
    final_train_loss: float = math.nan  # mean of the last 10 finite losses
    final_val_loss: float = math.nan
    spikes: int = 0
    spike_steps: list[int] = field(default_factory=list)
    divergence: dict[str, Any] | None = None  # {"step": int | None, "reason": str}
    excursion: int | None = None
    peak_above_start: float = math.nan  # highest finite loss minus the first (0 if never above)
    dead: str | None = None  # the reason, when the variant does not train
    down_in_amax_last: float = math.nan
    down_in_amax_peak: float = math.nan
    down_in_p99_last: float = math.nan
    down_in_kurtosis_last: float = math.nan
    down_in_max_rms_last: float = math.nan
    grad_gate_amax_last: float = math.nan
    grad_up_amax_last: float = math.nan
    grad_norm_last: float = math.nan  # median of the last 10 global gradient norms
    last_layer_hidden_var: float = math.nan
    last_layer_hidden_l2: float = math.nan
    bhyt_pearson_r_min: float = math.nan
    bhyt_pearson_r_layer_means: float = math.nan
    tanh_saturation_max: float = math.nan
    tanh_saturation_worst_site: str | None = None
    fp8: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> counter -> value
    step_ms_median: float = math.nan  # steps without a stability-probe sample, first one dropped
    tokens_per_s: float = math.nan
    probe_overhead_ms_mean: float = math.nan
    probe_samples: int = 0
    params_total: int = 0
    params_active: int = 0
    tokens_seen: int = 0
    tokens_per_param: float = math.nan
    wall_s: float = math.nan
    lr: float = math.nan
    precision: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def diverged(self) -> bool:
        return self.divergence is not None


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _last_with(rows: Sequence[Mapping[str, Any]], family: str) -> Mapping[str, Any] | None:
    return next((r for r in reversed(rows) if K.has_family(r, family)), None)


def dead_reason(rows: Sequence[Mapping[str, Any]], train_losses_steps: int | None = None) -> str | None:
    """Why a run does not train (vanishing gradients, saturated tanh), or None. See the module doc."""
    probe_row = _last_with(rows, K.GRAD_GATE)
    if probe_row is not None:
        gate = K.layer_values(probe_row, K.GRAD_GATE, "amax")
        up = K.layer_values(probe_row, K.GRAD_UP, "amax")
        for layer in sorted(gate):
            g, u = gate[layer], up.get(layer, math.nan)
            if math.isfinite(g) and g < DEAD_GRAD_AMAX and not (math.isfinite(u) and u >= DEAD_GRAD_AMAX):
                return (f"vanishing gradients: max |∂L/∂gate| = {g:.3g} and max |∂L/∂up| = {u:.3g} in "
                        f"layer {layer} at step {int(probe_row[K.STEP])} (< {DEAD_GRAD_AMAX:g})")
    norms = _finite([K.num(r.get(K.GRAD_NORM)) for r in rows if K.GRAD_NORM in r][-TAIL:])
    if norms and statistics.median(norms) < DEAD_GRAD_NORM:
        return f"vanishing gradients: global gradient norm {statistics.median(norms):.3g} (< {DEAD_GRAD_NORM:g})"
    sat_row = _last_with(rows, K.SAT)
    if sat_row is not None:
        sat = {k: K.num(v) for k, v in sat_row.items() if (p := K.parse_key(k)) and p.family == K.SAT}
        sat = {k: v for k, v in sat.items() if math.isfinite(v)}
        if sat:
            site = max(sat, key=sat.__getitem__)
            if sat[site] > DEAD_SATURATION:
                return (f"saturated tanh: {100 * sat[site]:.1f}% of |tanh| > 0.95 at {site} at step "
                        f"{int(sat_row[K.STEP])} (> {100 * DEAD_SATURATION:g}%)")
    return None


def _fp8_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per role: overflow / underflow summed over the probe rows (each covers the steps since the
    previous one), worst and median SNR, largest amax."""
    fp8_rows = [r for r in rows if K.fp8_key("overflow") in r]
    out: dict[str, dict[str, float]] = {}
    if not fp8_rows:
        return out
    for role in K.FP8_ROLES:
        col = {c: _finite([K.num(r.get(K.fp8_key(c, role))) for r in fp8_rows])
               for c in ("overflow", "underflow", "snr_db", "amax")}
        out[role] = {
            "overflow": math.fsum(col["overflow"]),
            "underflow": math.fsum(col["underflow"]),
            "snr_db_min": min(col["snr_db"], default=math.nan),
            "snr_db_median": statistics.median(col["snr_db"]) if col["snr_db"] else math.nan,
            "amax_max": max(col["amax"], default=math.nan),
        }
    return out


def summarize(
    rows: Sequence[Mapping[str, Any]],
    *,
    variant: str,
    activation: str,
    norm: str,
    spike_window: int,
    spike_threshold: float,
    stopped: tuple[int | None, str] | None = None,
    tokens_per_step: int = 0,
    **run_facts: Any,
) -> RunSummary:
    """The :class:`RunSummary` of one run's metric rows. ``stopped``: (step, reason) when the
    trainer stopped the run on a non-finite value. ``run_facts``: the other fields (parameter
    counts, tokens, timings, lr, precision)."""
    s = RunSummary(variant=variant, activation=activation, norm=norm, **run_facts)
    train = [r for r in rows if K.LOSS in r]
    losses = [K.num(r[K.LOSS]) for r in train]
    finite = _finite(losses)
    s.steps_logged = len(train)
    s.start_loss = finite[0] if finite else math.nan
    tail = _finite(losses[-TAIL:])
    s.final_train_loss = sum(tail) / len(tail) if tail else math.nan
    s.final_val_loss = next((K.num(r[K.VAL_LOSS]) for r in reversed(rows) if K.VAL_LOSS in r), math.nan)
    spikes = detect_spikes(losses, spike_window, spike_threshold) if len(losses) > spike_window else []
    s.spikes = len(spikes)
    s.spike_steps = [int(train[p.index][K.STEP]) for p in spikes]
    s.peak_above_start = max(0.0, max(finite) - s.start_loss) if finite else math.nan
    verdict = classify_run(losses)
    if stopped is not None:
        s.divergence = {"step": stopped[0], "reason": stopped[1]}
    elif verdict.diverged:
        index = verdict.divergence_index
        s.divergence = {"step": None if index is None else int(train[index][K.STEP]),
                        "reason": verdict.divergence_reason}
    elif verdict.excursion_index is not None:
        s.excursion = int(train[verdict.excursion_index][K.STEP])
    s.dead = dead_reason(rows)

    probe_row = _last_with(rows, K.DOWN_IN)
    s.down_in_amax_last = K.max_over_layers(probe_row, K.DOWN_IN, "amax")
    s.down_in_amax_peak = max(_finite([K.max_over_layers(r, K.DOWN_IN, "amax") for r in rows
                                       if K.has_family(r, K.DOWN_IN)]), default=math.nan)
    s.down_in_p99_last = K.max_over_layers(probe_row, K.DOWN_IN, "p99")
    s.down_in_kurtosis_last = K.max_over_layers(probe_row, K.DOWN_IN, "kurtosis")
    s.down_in_max_rms_last = K.max_over_layers(probe_row, K.DOWN_IN, "max_rms")
    s.grad_gate_amax_last = K.max_over_layers(probe_row, K.GRAD_GATE, "amax")
    s.grad_up_amax_last = K.max_over_layers(probe_row, K.GRAD_UP, "amax")
    norms = _finite([K.num(r.get(K.GRAD_NORM)) for r in rows if K.GRAD_NORM in r][-TAIL:])
    s.grad_norm_last = statistics.median(norms) if norms else math.nan

    hidden_row = _last_with(rows, K.HIDDEN)
    n_hidden = K.layer_count(rows, K.HIDDEN)
    if hidden_row is not None and n_hidden:
        s.last_layer_hidden_var = K.num(hidden_row.get(K.layer_key(K.HIDDEN, n_hidden - 1, "var")))
        s.last_layer_hidden_l2 = K.num(hidden_row.get(K.layer_key(K.HIDDEN, n_hidden - 1, "l2")))
    bhyt_r = list(K.layer_values(probe_row, K.BHYT, "pearson_r").values())
    s.bhyt_pearson_r_min = min(bhyt_r) if bhyt_r else math.nan
    # the per-layer means of every probed step, pooled: the coarser agreement a per-layer plot shows
    pairs = []
    for r in rows:
        approx, true = K.layer_values(r, K.BHYT, "v_approx"), K.layer_values(r, K.BHYT, "v_true")
        pairs += [(approx[i], true[i]) for i in approx if i in true
                  and math.isfinite(approx[i]) and math.isfinite(true[i])]
    if len(pairs) > 2:
        s.bhyt_pearson_r_layer_means = pearson_r(torch.tensor([p[0] for p in pairs]),
                                                 torch.tensor([p[1] for p in pairs]))
    sat: dict[str, float] = {}
    for key, value in (hidden_row or {}).items():
        parsed = K.parse_key(key)
        if parsed is not None and parsed.family == K.SAT and math.isfinite(K.num(value)):
            sat[key.removeprefix(K.SAT + "/")] = K.num(value)
    if sat:
        s.tanh_saturation_worst_site = max(sat, key=sat.__getitem__)
        s.tanh_saturation_max = sat[s.tanh_saturation_worst_site]

    s.fp8 = _fp8_summary(rows)
    if tokens_per_step:
        times = [tokens_per_step / K.num(r[K.TOKENS_PER_S]) for r in rows
                 if K.num(r.get(K.TOKENS_PER_S)) > 0 and not K.has_family(r, K.DOWN_IN)]
        s.step_ms_median = 1000 * statistics.median(times[1:]) if len(times) > 1 else math.nan
    overhead = [K.num(r[K.PROBE_OVERHEAD]) for r in rows if K.PROBE_OVERHEAD in r]
    s.probe_overhead_ms_mean = sum(overhead) / len(overhead) if overhead else math.nan
    s.probe_samples = len(overhead)
    s.tokens_per_param = s.tokens_seen / max(1, s.params_active)
    return s


def status(s: RunSummary) -> str:
    """One phrase for tables: ok / dead (reason) / diverged (reason) / ok with an excursion."""
    if s.divergence:
        d = s.divergence
        return f"diverged{'' if d.get('step') is None else ' at step ' + str(d['step'])}: {d['reason']}"
    if s.dead:
        return f"dead — {s.dead}"
    if s.excursion:
        return f"ok (transient loss above start at step {s.excursion})"
    return "ok"


def pick_lr(runs: Sequence[tuple[float, RunSummary]], fallback: float) -> float:
    """The LR of ``(lr, summary)`` runs with the lowest final validation loss among runs that
    neither diverged nor died; ``fallback`` when every run did (the fair-baseline LR pick)."""
    ok = [(s.final_val_loss, lr) for lr, s in runs
          if not s.diverged and not s.dead and math.isfinite(s.final_val_loss)]
    return min(ok)[1] if ok else fallback
