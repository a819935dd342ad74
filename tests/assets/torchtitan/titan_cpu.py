"""TEST-ONLY shims to run torchtitan 0.3.0's own trainer (``torchtitan.train``) on a CPU-only
machine, with steadylm's PowLU + BHyT debug config. Not part of the library: on GPUs the README's
command needs none of this.

Run as a script, this module is ``python -m torchtitan.train`` with shims 1, 3 and 4 installed
first; ``--module titan_cpu`` gives the configs below (shim 2). One process (what torchrun sets)::

    LOCAL_RANK=0 RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
    PYTHONPATH=tests/assets/torchtitan python tests/assets/torchtitan/titan_cpu.py \\
        --module titan_cpu --config llama3_debugmodel_powlu_bhyt_cpu_reference \\
        --hf_assets_path TOKENIZER_DIR --dataloader.dataset_path C4_TEST_DIR \\
        --training.steps 8 --training.seq_len 64 --training.local_batch_size 4

or ``torchrun --nproc_per_node 2 tests/assets/torchtitan/titan_cpu.py ...`` with
``--parallelism.tensor_parallel_degree 2`` (or ``data_parallel_shard_degree 2``) and
``--parallelism.spmd_backend partial_dtensor`` (the default ``spmd_types`` backend fails over 2
CPU ranks for torchtitan's stock Llama-3 too). tests/test_torchtitan_trainer.py builds the tiny
corpus and tokenizer (TOKENIZER_DIR, C4_TEST_DIR) these runs read.

What torchtitan 0.3.0 needs on CPU, each seen failing without it:

1. Device module. ``torchtitan.tools.utils`` picks ``_get_available_device_type() or "cuda"``,
   so on a CPU-only torch it is ``cuda`` and ``Trainer.__init__`` fails at
   ``device_module.set_device(self.device)`` (trainer.py:301, ``torch._C`` has no
   ``_cuda_setDevice``); with ``torch.cpu`` in its place, ``DeviceMemoryMonitor`` fails at
   ``device_module.get_device_name`` (metrics.py:42). The shim below is ``device_type = "cpu"`` and
   a device module with the few calls torchtitan makes (no memory statistics on CPU: they read as
   -1). The process group is then gloo (torchtitan's choice for a ``cpu`` device).
2. Attention. Llama-3's only attention backends are Flex (``"flex"``, the default) and varlen; the
   first training step fails in ``torch.nn.attention.flex_attention._validate_device``:
   "FlexAttention does not support backward on CPU". The config below swaps the inner attention
   for torchtitan's ``ScaledDotProductAttention`` (causal, no per-document mask — the maskless
   backend torchtitan's own graph_trainer tests use; the trainer then passes no masks).
3. Process-group timeout. After the first step ``Trainer.train`` calls
   ``dist_utils.set_pg_timeouts`` (distributed/utils.py:595), which calls
   ``torch.distributed.set_timeout`` — absent from this torch build (AttributeError). The shim
   points it at ``torch.distributed.distributed_c10d._set_pg_timeout`` (the same operation, which
   handles gloo) where it is missing.
4. FSDP2 gradient reduction on gloo (only with ``data_parallel_shard_degree`` > 1). FSDP2
   reduce-scatters with ``ReduceOp.PREMUL_SUM`` (torchtitan's divide factor): "RuntimeError:
   Cannot use ReduceOp.PREMUL_SUM with Gloo". The shim makes FSDP2 reduce with SUM and divide
   separately (its own ``force_sum_reduction_for_comms`` path, meant for backends without it).

Everything else — the config registry and CLI, ``update_from_config`` and its sharding plans,
meta-device build, the module-protocol check, ``parallelize_llama`` (``Module.parallelize`` on
the 1-rank mesh, FSDP2 wrapping), ``init_weights``, the optimizer container and
``post_optimizer_build_fn``, the LR schedule, the dataloader and tokenizer, DCP checkpoints — is
torchtitan's own code, unpatched.
"""

from __future__ import annotations

import os
import runpy
import types
from typing import Any


def _debugmodel_cpu(impl: str) -> Any:
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import config_registry as llama3

    from steadylm.integrations.torchtitan.config_registry import with_powlu_bhyt

    # = steadylm.integrations.torchtitan's llama3_debugmodel_powlu_bhyt, with ``impl`` and c_ℓ
    # refreshed every 4 optimizer steps (K; the library's debug config: 5) for a short test run
    config = with_powlu_bhyt(llama3.llama3_debugmodel(), refresh_every=4, impl=impl)
    for layer in config.model_spec.model.layers:  # shim 2
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config.validator.enable = False  # its default dataset is the full C4 validation split
    return config


def llama3_debugmodel_powlu_bhyt_cpu() -> Any:
    """``steadylm.integrations.torchtitan``'s ``llama3_debugmodel_powlu_bhyt`` (6 × 256, PowLU +
    BHyT, c_ℓ every 4 steps, steadylm's fused ops) with SDPA in place of Flex attention (shim 2).
    On CPU the fused ops are Inductor-compiled on first use (about a minute on 2 cores with a cold
    compile cache)."""
    return _debugmodel_cpu("fused")


def llama3_debugmodel_powlu_bhyt_cpu_reference() -> Any:
    """The same with steadylm's reference math (``impl="reference"``: the same values, nothing to
    compile) — the default-suite run."""
    return _debugmodel_cpu("reference")


def llama3_debugmodel_cpu() -> Any:
    """torchtitan's own ``llama3_debugmodel`` with shim 2, for steadylm's ``--override.imports``."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import config_registry as llama3

    config = llama3.llama3_debugmodel()
    for layer in config.model_spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config.validator.enable = False
    return config


def install_cpu_device() -> None:
    """Shim 1: torchtitan's device type and module on a CPU-only machine."""
    import torchtitan.tools.utils as tt_utils

    def total_memory() -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    tt_utils.device_type = "cpu"
    tt_utils.device_module = types.SimpleNamespace(
        set_device=lambda device: None, device_count=lambda: 1, current_device=lambda: 0,
        get_device_name=lambda device=None: "cpu",
        get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=total_memory()),
        memory_stats=lambda device=None: {}, reset_peak_memory_stats=lambda device=None: None,
        empty_cache=lambda: None, synchronize=lambda device=None: None)


def install_pg_timeout() -> None:
    """Shim 3: ``torch.distributed.set_timeout`` where this torch lacks it."""
    import torch.distributed
    from torch.distributed import distributed_c10d

    if not hasattr(torch.distributed, "set_timeout"):
        torch.distributed.set_timeout = distributed_c10d._set_pg_timeout


def install_gloo_fsdp_reduction() -> None:
    """Shim 4: FSDP2 reduces gradients with SUM (and divides apart) instead of PREMUL_SUM."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    divide_factors = _fsdp_collectives._get_gradient_divide_factors

    def sum_only(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 5:  # (groups, reduce_dtype, device_type, factor, force_sum_reduction_for_comms)
            args = (*args[:5], True, *args[6:])
        else:
            kwargs["force_sum_reduction_for_comms"] = True
        return divide_factors(*args, **kwargs)

    _fsdp_collectives._get_gradient_divide_factors = sum_only


if __name__ == "__main__":
    # before torchtitan's trainer modules import device_type/device_module by value
    install_cpu_device()
    install_pg_timeout()
    install_gloo_fsdp_reduction()
    runpy.run_module("torchtitan.train", run_name="__main__", alter_sys=True)
