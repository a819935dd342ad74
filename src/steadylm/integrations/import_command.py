"""``steadylm import HF_DIR OUT_DIR``: a local Llama/Mistral/Qwen2/Qwen3 checkpoint as a steadylm model.

OUT_DIR becomes a steadylm run directory holding a step-0 checkpoint (format 2, steadylm names), the model
config, and the checkpoint's tokenizer: ``steadylm export``, ``steadylm scan`` and
``steadylm train --init-from`` read it. ``--activation`` / ``--norm`` switch the model on the way
in (the PowLU paper's mid-training switch on a real checkpoint): weights are kept, new parameters
(λ of BHyT) start at their defaults. Weights are read from safetensors; no code from HF_DIR runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from steadylm.errors import CheckpointError

__all__ = ["add_arguments", "run", "import_to_run_dir"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from steadylm.models.forms import block_form_names
    from steadylm.nn import ACTIVATIONS

    parser.add_argument("hf_dir", metavar="HF_DIR", help="a local Hugging Face model directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the steadylm run directory to write")
    parser.add_argument("--seq-len", type=int, default=None, metavar="T",
                        help="training context length T (ModelConfig.max_seq_len, c_l's T); "
                        "default: the checkpoint's max_position_embeddings")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None,
                        help="switch the FFN activation (weights kept)")
    parser.add_argument("--norm", choices=list(block_form_names()), default=None,
                        help="switch the block form (gains kept where the parameter exists)")


def import_to_run_dir(hf_dir: str | Path, out_dir: str | Path, *, max_seq_len: int | None = None,
                      **changes: object) -> Path:
    """Import ``hf_dir`` into the run directory ``out_dir``; returns the checkpoint path."""
    import torch

    from steadylm.train.atomic import atomic_write_text
    from steadylm.train.dcp import save_dcp_checkpoint
    from steadylm.train.model_dir import is_hf_dir, load_model_dir

    source = Path(hf_dir).expanduser()
    if not is_hf_dir(source):
        raise CheckpointError(f"{source} is not a Hugging Face model directory (config.json with architectures)")
    model = load_model_dir(source, max_seq_len=max_seq_len).build(
        **{k: v for k, v in changes.items() if v is not None})
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    configs = {"model": model.config.to_dict(), "source": {"hf_dir": str(source.resolve())}}
    optimizer = torch.optim.AdamW(model.parameters())  # no state yet: a step-0 checkpoint
    # the current checkpoint format (2, DCP), as `steadylm train` writes it
    path = save_dcp_checkpoint(out, model, optimizer, 0, configs=configs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    atomic_write_text(out / "config.json", json.dumps(configs, indent=2))
    return path


def run(args: argparse.Namespace) -> int:
    path = import_to_run_dir(args.hf_dir, args.out_dir, max_seq_len=args.seq_len,
                             activation=args.activation, norm=args.norm)
    print(f"{path}: steadylm checkpoint")
    return 0
