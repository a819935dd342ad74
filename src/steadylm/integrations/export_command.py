"""``steadylm export RUN_DIR OUT_DIR``: a training run as a Hugging Face model directory.

Writes ``config.json``, ``model.safetensors`` (HF names), ``generation_config.json`` and the
tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) when the run has one (an imported
checkpoint may not: the model is written and the command says it has none). A swiglu + rmsnorm dense model becomes
a plain ``LlamaForCausalLM``; every other variant is the ``steadylm`` model type (load it with
``trust_remote_code=True`` where steadylm is installed). Needs ``pip install steadylm[hf]``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a steadylm run directory (with checkpoint/) "
                        "or a directory written by `steadylm import`")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face model directory to write")
    parser.add_argument("--tokenizer", metavar="FILE", default=None,
                        help="tokenizer.json to ship (default: RUN_DIR/tokenizer.json, else the cached "
                        "tokenizer the run was trained with)")


def run(args: argparse.Namespace) -> int:
    from steadylm.integrations.transformers import export_run
    from steadylm.integrations.transformers.convert import exported_architecture, has_tokenizer

    out = export_run(args.run_dir, args.out_dir, tokenizer_file=args.tokenizer)
    print(f"{out}: {exported_architecture(out)}")
    if not has_tokenizer(out):
        print(f"{out}: no tokenizer (none in {args.run_dir}, its run spec or the tokenizer cache); "
              "the model loads without one; pass --tokenizer FILE to ship one", file=sys.stderr)
    return 0
