"""Config-built decoders: Llama-style dense and Ling-style MoE, any activation × norm (SPEC §2–§3).

```python
from steadylm.models import ModelConfig, build_model
cfg = ModelConfig.from_preset("nano", activation="powlu", norm="bhyt", vocab_size=2048)
model = build_model(cfg)
logits = model(tokens)                              # [batch, seq, vocab]
loss = model(tokens, targets=next_tokens)           # mean cross-entropy, logits never stored
model.after_optimizer_step(step, total_steps)       # router bias, c_l refresh every K steps
```
"""

from steadylm.models.attention import Attention, KVCache, RotaryEmbedding, apply_rotary
from steadylm.models.blocks import BLOCK_CLASSES, BHyTBlock, DecoderBlock, build_block
from steadylm.models.forms import BLOCK_FORMS, BlockForm, get_block_form, register_block_form
from steadylm.models.config import (
    BLOCK_NORMS,
    FINAL_NORMS,
    PRESETS,
    ModelConfig,
    ParamCount,
    count_parameters,
    default_refresh_interval,
)
from steadylm.models.moe import MoE, RoutedExperts, Router
from steadylm.models.transformer import Transformer, build_model, takes_targets

__all__ = [
    "BLOCK_CLASSES",
    "BLOCK_FORMS",
    "BLOCK_NORMS",
    "FINAL_NORMS",
    "PRESETS",
    "Attention",
    "BHyTBlock",
    "BlockForm",
    "DecoderBlock",
    "KVCache",
    "MoE",
    "ModelConfig",
    "ParamCount",
    "RotaryEmbedding",
    "RoutedExperts",
    "Router",
    "Transformer",
    "apply_rotary",
    "build_block",
    "build_model",
    "takes_targets",
    "count_parameters",
    "default_refresh_interval",
    "get_block_form",
    "register_block_form",
]
