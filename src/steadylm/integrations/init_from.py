"""``steadylm.integrations.init_from`` (named in README): the run-from-weights loader now lives in
:mod:`steadylm.train.init_from`, the layer that uses it; this path keeps working."""

from steadylm.train.init_from import InitFrom, init_from

__all__ = ["InitFrom", "init_from"]
