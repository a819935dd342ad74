"""Bridges to other frameworks. Each lives in its own subpackage behind an optional extra:

* :mod:`steadylm.integrations.transformers` — Hugging Face transformers (``pip install steadylm[hf]``).
"""
