"""``steadylm params``: total and active parameter counts of every preset.

The counts come from :func:`steadylm.models.count_parameters` (closed form, from the config alone);
``--verify`` also builds each model on the ``meta`` device (no memory, no init cost) and checks the
module count against it. ``--names`` lists instead the norms (block forms) and activations a config
may name, with the module that registers each: plug-ins loaded with ``--plugin`` /
``$STEADYLM_PLUGINS`` included (the table also names the plug-ins' own under it).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from steadylm.errors import ConfigError

__all__ = ["add_arguments", "config_names", "parse_overrides", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "presets",
        nargs="*",
        metavar="PRESET",
        help="presets to show (default: all)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ModelConfig field for every preset, e.g. --set vocab_size=2048 "
        "--set norm=bhyt (VALUE is parsed as JSON, else kept as a string); repeatable",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also build each model on the meta device and check its count matches",
    )
    parser.add_argument(
        "--names",
        action="store_true",
        help="list the norms (--set norm=NAME) and activations (--set activation=NAME) a config may "
        "name, with the module registering each (plug-ins included), instead of the counts",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["dim=256", "norm=bhyt"]`` -> ``{"dim": 256, "norm": "bhyt"}`` (values parsed as JSON)."""
    overrides: dict[str, Any] = {}
    for item in items:
        field, sep, raw = item.partition("=")
        if not sep or not field.strip():
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides[field.strip()] = value
    return overrides


def config_names() -> list[dict[str, Any]]:
    """Every norm (block form) and activation name a ``ModelConfig`` may take, in registration
    order: ``{"kind": "norm" | "activation", "name", "module", "plugin"}``, ``module`` being
    where the norm class or the activation is defined and ``plugin`` whether that is outside steadylm."""
    from steadylm.models.forms import block_form_names, get_block_form
    from steadylm.nn import ACTIVATIONS, NORM_SPECS
    from steadylm.plugins import is_plugin_module

    modules = [("norm", name, NORM_SPECS[get_block_form(name).norm].module) for name in block_form_names()]
    modules += [("activation", name, spec.module) for name, spec in ACTIVATIONS.items()]
    return [
        {"kind": kind, "name": name, "module": module, "plugin": is_plugin_module(module)}
        for kind, name, module in modules
    ]


def _print_names(names: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(names, indent=2))
        return
    for kind in ("norm", "activation"):
        shown = [n["name"] + (f" ({n['module']})" if n["plugin"] else "") for n in names if n["kind"] == kind]
        print(f"{kind}s: {', '.join(shown)}")


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def run(args: argparse.Namespace) -> int:
    from steadylm.models.config import PRESETS, ModelConfig, count_parameters

    if args.names:
        if args.presets or args.overrides or args.verify:
            raise ConfigError("--names lists the registered names; it takes no presets, --set or --verify")
        _print_names(config_names(), args.json)
        return 0
    overrides = parse_overrides(args.overrides)
    names = args.presets or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")

    rows: list[dict[str, Any]] = []
    mismatches: list[str] = []
    for name in names:
        config = ModelConfig.from_preset(name, **overrides)
        count = count_parameters(config)
        row: dict[str, Any] = {
            "preset": name,
            "total": count.total,
            "active": count.active,
            "embedding": count.embedding,
            "dim": config.dim,
            "n_layers": config.n_layers,
            "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads,
            "vocab_size": config.vocab_size,
            "experts": f"{config.moe_top_k}/{config.n_experts}" if config.is_moe else "-",
        }
        if args.verify:
            from steadylm.models.transformer import build_model

            built = build_model(config, device="meta").num_params()
            row["verified"] = built["total"] == count.total and built["active"] == count.active
            if not row["verified"]:
                mismatches.append(f"{name}: formula {count.total}/{count.active}, modules {built['total']}/{built['active']}")
        rows.append(row)

    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, verified=args.verify, overrides=overrides)
    for line in mismatches:
        print(f"MISMATCH {line}")
    return 1 if mismatches else 0


def _print_table(rows: list[dict[str, Any]], verified: bool, overrides: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "steadylm presets: parameter counts"
    if overrides:
        title += " (" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + ")"
    table = Table(title=title)
    for column in ("preset", "total", "active", "non-embedding", "dim", "layers", "heads (kv)", "vocab", "top-k/experts"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    if verified:
        table.add_column("modules agree", justify="center")
    for row in rows:
        cells = [
            row["preset"],
            f"{row['total']:,} ({_fmt(row['total'])})",
            f"{row['active']:,} ({_fmt(row['active'])})",
            _fmt(row["total"] - row["embedding"]),
            str(row["dim"]),
            str(row["n_layers"]),
            f"{row['n_heads']} ({row['n_kv_heads']})",
            str(row["vocab_size"]),
            row["experts"],
        ]
        if verified:
            cells.append("yes" if row["verified"] else "NO")
        table.add_row(*cells)
    Console(width=160).print(table)
    from_plugins = [n for n in config_names() if n["plugin"]]
    if from_plugins:
        print("from plug-ins: " + ", ".join(f"{n['kind']} {n['name']} ({n['module']})" for n in from_plugins))
