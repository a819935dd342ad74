"""steadylm inside Hugging Face transformers, and checkpoints both ways (``pip install steadylm[hf]``).

```python
import steadylm.integrations.transformers as slt     # runs register()
model = AutoModelForCausalLM.from_pretrained(path)
slt.apply_steadylm(model, activation="powlu", norm="bhyt")   # in place, weights kept
trainer = Trainer(model, args, callbacks=[slt.SteadyLMCallback()], ...)
```

:func:`register` (run on import) makes ``hidden_act="powlu"`` / ``"swiglu_clip"`` (and
``"swiglu_clip_step"``, ``"swiglu_clip_clamp"``) valid for every HF model whose MLP is
``act(gate) * up`` (PowLU's m from ``config.powlu_m``, else 3; the clip limit from
``config.swiglu_clip_limit``), and registers the ``steadylm`` model type with ``AutoConfig`` and
``AutoModelForCausalLM``. Requires transformers >= 5.3.
"""

from __future__ import annotations

from typing import Any

from steadylm.errors import SteadyLMError

__all__ = [
    "MIN_TRANSFORMERS",
    "SteadyLMCallback",
    "SteadyLMConfig",
    "SteadyLMForCausalLM",
    "apply_steadylm",
    "export_model",
    "export_run",
    "import_hf",
    "load_hf_model",
    "refresh_bhyt",
    "register",
]

#: Oldest transformers release this integration supports.
MIN_TRANSFORMERS = "5.3"


class TransformersVersionError(SteadyLMError, ImportError):
    """transformers is missing or older than :data:`MIN_TRANSFORMERS`."""


def _check_transformers() -> None:
    try:
        import transformers
    except ImportError:
        raise TransformersVersionError(
            f"steadylm.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}: "
            "pip install 'steadylm[hf]'"
        ) from None
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise TransformersVersionError(
            f"steadylm.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}, "
            f"found {transformers.__version__}: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


_check_transformers()

from steadylm.models.hf_format import import_hf, load_hf_model  # noqa: E402
from steadylm.integrations.transformers.convert import export_model, export_run  # noqa: E402
from steadylm.integrations.transformers.modeling import SteadyLMConfig, SteadyLMForCausalLM  # noqa: E402
from steadylm.integrations.transformers.patch import (  # noqa: E402
    HIDDEN_ACTS,
    SteadyLMGate,
    _init_steadylm_module,
    _make_callback_class,
    activation_kwargs_from_config,
    apply_steadylm,
    refresh_bhyt,
)

SteadyLMCallback = _make_callback_class()

_REGISTERED = False


def register() -> None:
    """Register steadylm's activations and model type with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, activations

    for name, (activation, fixed) in HIDDEN_ACTS.items():
        entry = (SteadyLMGate, {"activation": activation, **fixed})
        activations.ACT2CLS[name] = entry
        activations.ACT2FN[name] = entry  # ACT2FN is a copy of ACT2CLS made at import
    AutoConfig.register(SteadyLMConfig.model_type, SteadyLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(SteadyLMConfig, SteadyLMForCausalLM, exist_ok=True)

    original_init_weights = PreTrainedModel._init_weights
    original_post_init = PreTrainedModel.post_init

    def _init_weights(self: Any, module: Any) -> None:
        original_init_weights(self, module)
        _init_steadylm_module(module)

    def post_init(self: Any) -> None:
        original_post_init(self)
        # hidden_act modules are built without the config: give them its hyper-parameters.
        for module in self.modules():
            if isinstance(module, SteadyLMGate):
                kwargs = activation_kwargs_from_config(module.act.name, self.config)
                if kwargs:
                    module.configure_gate(module.act.name, module.act.impl, **kwargs)

    PreTrainedModel._init_weights = _init_weights  # type: ignore[method-assign]
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
    _REGISTERED = True


register()
