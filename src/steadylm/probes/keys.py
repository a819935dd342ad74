"""Metric keys: the one place that builds and parses the flat keys of ``metrics.jsonl``.

A metrics row is a flat dict. The trainer writes the run keys (:data:`STEP` ... :data:`DIVERGED`);
the probes write layered keys, ``FAMILY/layer{i}[/PART]/STAT``::

    ffn_down_in/layer3/p99            FFN down-projection input, layer 3, statistic p99
    ffn_down_in/layer3/routed/p99     the same for the routed experts of an MoE layer
    hidden/layer3/var                 block output: mean per-token variance
    sat/layer3/attn_norm, sat/final_norm     tanh saturation of a norm site
    lam/layer3/ffn_norm, alpha/final_norm    BHyT λ / DyT α of a site
    bhyt/layer3/pearson_r             BHyT second-site variance estimate
    moe/layer3/load_cv                MoE expert load
    depth/layer3/cos                  cosine(block input, block output) (the depth ladder's probe)

and the FP8 counters are ``fp8/ROLE/COUNTER`` (all modules), ``fp8/MODULE/ROLE/COUNTER`` (one FP8
linear; module names use dots) and ``fp8/overflow``, ``fp8/underflow`` (totals).

Builders return exactly the strings the probes have always written, so metrics files of older runs
stay readable; readers use :func:`parse_key` / :func:`layer_values` / :func:`parse_fp8_key`
instead of splitting strings themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALPHA", "BHYT", "DEPTH", "DIVERGED", "EMBED_SCALE", "FFN_FAMILIES", "FP8", "FP8_ROLES",
    "GRAD_GATE", "GRAD_NORM", "GRAD_UP", "HIDDEN", "LAM", "LOSS", "LR", "MOE", "PROBE_OVERHEAD",
    "DOWN_IN", "SAT", "STEP", "TOKENS_PER_S", "TOKENS_SEEN", "VAL_LOSS", "Fp8Key", "LayerKey",
    "FINAL_SITE", "fp8_key", "has_family", "layer_count", "layer_key", "layer_values", "max_over_layers", "num", "parse_fp8_key",
    "parse_key", "site_key",
]

# --- run keys (written by the trainer) ---------------------------------------------------------
STEP = "step"
LOSS = "loss"
VAL_LOSS = "val_loss"
LR = "lr"
GRAD_NORM = "grad_norm"
TOKENS_PER_S = "tokens_per_s"  # per row: tokens / compute time since the previous row
TOKENS_SEEN = "tokens_seen"
DIVERGED = "diverged"

# --- probe key families ------------------------------------------------------------------------
DOWN_IN = "ffn_down_in"
GRAD_GATE = "grad_gate_out"
GRAD_UP = "grad_up_out"
#: families that carry the tensor statistics of :data:`steadylm.probes.stats.STAT_NAMES`
FFN_FAMILIES: tuple[str, ...] = (DOWN_IN, GRAD_GATE, GRAD_UP)
HIDDEN = "hidden"
SAT = "sat"
LAM = "lam"
ALPHA = "alpha"
BHYT = "bhyt"
MOE = "moe"
DEPTH = "depth"
EMBED_SCALE = "embed_scale"
PROBE_OVERHEAD = "probe/overhead_ms"
FP8 = "fp8"
FP8_ROLES: tuple[str, ...] = ("input", "weight", "grad_output")
#: the site name of the norm after the last block (``sat/final_norm``, ``lam/final_norm``)
FINAL_SITE = "final_norm"

_LAYER = re.compile(r"layer(\d+)$")


@dataclass(frozen=True)
class LayerKey:
    """A parsed probe key: ``family/layer{layer}[/part]/stat``, or ``family/stat`` (layer None)."""

    family: str
    layer: int | None
    stat: str
    part: str = ""  # "routed" / "shared" in MoE layers, "" otherwise

    def __str__(self) -> str:
        if self.layer is None:
            return f"{self.family}/{self.stat}"
        return layer_key(self.family, self.layer, self.stat, self.part)


@dataclass(frozen=True)
class Fp8Key:
    """A parsed FP8 counter key; ``module`` None for the all-module sums, ``role`` None for totals."""

    module: str | None
    role: str | None
    counter: str


def layer_key(family: str, layer: int, stat: str, part: str = "") -> str:
    """``family/layer{layer}[/part]/stat``."""
    middle = f"/{part}" if part else ""
    return f"{family}/layer{int(layer)}{middle}/{stat}"


def site_key(family: str, site: str, layer: int | None = None) -> str:
    """A norm-site key (``sat``, ``lam``, ``alpha``): ``family/layer{i}/site`` or ``family/site``
    for a site outside the blocks (``final_norm``)."""
    return f"{family}/{site}" if layer is None else layer_key(family, layer, site)


def fp8_key(counter: str, role: str | None = None, module: str | None = None) -> str:
    """``fp8/counter`` (totals), ``fp8/role/counter`` or ``fp8/module/role/counter``."""
    if role is None:
        return f"{FP8}/{counter}"
    return f"{FP8}/{role}/{counter}" if module is None else f"{FP8}/{module}/{role}/{counter}"


def parse_key(key: str) -> LayerKey | None:
    """The parts of a probe key, or None for a key that is not ``family/...`` (``loss``, ...).
    FP8 keys parse with :func:`parse_fp8_key` instead (None here)."""
    parts = key.split("/")
    if len(parts) < 2 or parts[0] == FP8:
        return None
    m = _LAYER.match(parts[1])
    if m is None:
        return LayerKey(parts[0], None, "/".join(parts[1:]))
    rest = parts[2:]
    if len(rest) == 1:
        return LayerKey(parts[0], int(m.group(1)), rest[0])
    if len(rest) == 2:
        return LayerKey(parts[0], int(m.group(1)), rest[1], rest[0])
    return None


def parse_fp8_key(key: str) -> Fp8Key | None:
    """The parts of an FP8 counter key, or None for any other key."""
    parts = key.split("/")
    if parts[0] != FP8 or len(parts) < 2:
        return None
    if len(parts) == 2:
        return Fp8Key(None, None, parts[1])
    if len(parts) == 3:
        return Fp8Key(None, parts[1], parts[2])
    if len(parts) == 4:
        return Fp8Key(parts[1], parts[2], parts[3])
    return None


def num(value: Any) -> float:
    """A metric value as a float; NaN for a missing, None (non-finite when written) or non-number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def layer_values(row: Mapping[str, Any] | None, family: str, stat: str,
                 part: str | None = None) -> dict[int, float]:
    """``{layer: value}`` of ``family/layer{i}[/part]/stat`` in ``row``. ``part`` None takes
    every part (dense and MoE layers alike; several parts of one layer: their maximum)."""
    out: dict[int, float] = {}
    for key, value in (row or {}).items():
        k = parse_key(key)
        if k is None or k.family != family or k.layer is None or k.stat != stat:
            continue
        if part is not None and k.part != part:
            continue
        v = num(value)
        out[k.layer] = v if k.layer not in out else max(out[k.layer], v)
    return out


def max_over_layers(row: Mapping[str, Any] | None, family: str, stat: str) -> float:
    """The largest finite ``family/layer*/stat`` value of ``row`` (every part); NaN if none."""
    vals = [v for v in layer_values(row, family, stat).values() if math.isfinite(v)]
    return max(vals) if vals else math.nan


def layer_count(rows: Iterable[Mapping[str, Any]], family: str) -> int:
    """1 + the largest layer index of a ``family/layer{i}/...`` key in any row (0 if none)."""
    n = -1
    for r in rows:
        for key in r:
            k = parse_key(key)
            if k is not None and k.family == family and k.layer is not None:
                n = max(n, k.layer)
    return n + 1


def has_family(row: Mapping[str, Any], family: str) -> bool:
    """Whether ``row`` holds any key of ``family`` (e.g. a row the stability probe sampled)."""
    prefix = family + "/"
    return any(key.startswith(prefix) for key in row)
