"""``spec_field``: a dataclass field that carries its own CLI help, short flag and choices.

Config dataclasses of every layer declare their user-facing fields with it, so that
:mod:`steadylm.train.spec` can generate the command-line flags and config-file keys from the
fields alone (one source for each fact). Like :mod:`steadylm.errors`, importable from any layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["spec_field"]


def spec_field(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
               choices: Callable[[], Sequence[str]] | Sequence[str] | None = None,
               default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with ``help`` text, an optional short ``flag`` (e.g. ``"--lr"``) and
    ``choices`` (a sequence, or a callable evaluated only when flags are built, so a registry is
    read lazily)."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
