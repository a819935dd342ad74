"""The ``steadylm`` command line.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its command runs, so ``steadylm --help``
stays fast and one broken optional dependency cannot take down every command. Every command takes
``--plugin MODULE`` (and ``$STEADYLM_PLUGINS``): :mod:`steadylm.plugins`, loaded before parsing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from steadylm.errors import SteadyLMError
from steadylm.plugins import ENV_VAR, load_plugins, plugins_from_argv

# command name -> (module path, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("steadylm.train.command", "train one run (one process, or many under torchrun with DDP/FSDP2)"),
    "compare": ("steadylm.lab.compare", "train the variants on a corpus and write a report with plots"),
    "stress": ("steadylm.lab.stress", "stress protocols: LR sweep, mid-training switch, FP8 vs bf16"),
    "ladder": ("steadylm.lab.ladder", "size and depth ladders: fitted scaling laws, variance vs depth"),
    "params": ("steadylm.models.params", "print total and active parameter counts of the presets"),
    "bench": ("steadylm.bench", "benchmarks (ops: fused vs eager vs torch.compile; model: train/generate tokens/s)"),
    "data": ("steadylm.data.prepare", "data prepare SRC OUT: tokenize a corpus into memory-mapped token shards"),
    "export": ("steadylm.integrations.export_command", "export RUN_DIR OUT_DIR: a run as a Hugging Face model directory"),
    "import": ("steadylm.integrations.import_command", "import HF_DIR OUT_DIR: a Llama/Mistral/Qwen2/Qwen3 checkpoint as a steadylm model"),
    "scan": ("steadylm.scan", "scan MODEL_DIR --data FILE --out DIR: outliers, variance, FP8 risk and a PowLU/Clip what-if"),
    "report": ("steadylm.lab.run_report", "report RUN_DIR [RUN_DIR ...] --out DIR: the lab's report for any train runs, side by side"),
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steadylm", description="Stable low-precision LLM pre-training: library and lab."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_path, help_text) in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        cmd_parser.add_argument(
            "--plugin", action="append", default=[], metavar="MODULE",
            help=f"import MODULE first: its norms, activations and block forms become choices "
            f"(repeatable; also ${ENV_VAR}=mod1,mod2)")
        if name == command:
            importlib.import_module(module_path).add_arguments(cmd_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    try:
        load_plugins(plugins_from_argv(argv))  # before the parser: registrations shape its choices
    except SteadyLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parser = _build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except SteadyLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
