"""steadylm: stable low-precision LLM pre-training.

Layers, each depending only on the ones before it::

    functional  pure math, float64-checkable reference semantics
    kernels     fused implementations of the same ops (same signatures)
    nn          modules and the activation / norm registries
    models      config dataclasses -> dense and Ling-style MoE decoders
    precision   FP8 linear layers and their counters
    probes      stability measurements taken during training
    data/train  corpus, tokenizer, trainer, checkpoints
    lab         compare / stress protocols and the HTML report
    cli         the ``steadylm`` command
"""

__version__ = "0.1.0"
