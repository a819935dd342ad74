"""Errors that describe bad user input.

The CLI prints these as one line (``error: ...``) without a traceback; anything else is a bug and
keeps its traceback. Each subclasses the builtin a Python user would expect to catch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class SteadyLMError(Exception):
    """Base class: a problem with the user's input, reported without a traceback by the CLI."""


class ConfigError(SteadyLMError, ValueError):
    """An invalid configuration value; the message names the field and its allowed range."""


class DataError(SteadyLMError, ValueError):
    """A missing or unreadable corpus, or one too small for the requested run."""


class CheckpointError(SteadyLMError, RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match the model being resumed."""


class DivergenceError(SteadyLMError, RuntimeError):
    """Training produced a non-finite loss; the message says at which step."""


class RunDirectoryInUse(SteadyLMError, RuntimeError):
    """Another live process is writing the run directory; the message names it and its holder."""


class OutputError(SteadyLMError, OSError):
    """A file of the run could not be written (full disk, read-only file system, missing
    directory); the message names the file and the cause. Anything written before is intact."""


class DistributedError(SteadyLMError, RuntimeError):
    """A peer rank died or stalled past the collective timeout; the message names this rank."""


class RunInterrupted(SteadyLMError, RuntimeError):
    """A second preemption signal arrived while the preemption checkpoint was being written."""


class RunPreempted(SteadyLMError, RuntimeError):
    """A preemption signal stopped the run after its checkpoint; ``--resume`` continues it. The CLI
    exits with :attr:`exit_code` (75, EX_TEMPFAIL) so a job script can requeue."""

    exit_code = 75


def check_choice(name: str, value: Any, allowed: Iterable[Any], *, hint: str | None = None,
                 error: type[SteadyLMError] = ConfigError) -> None:
    """Raise ``error`` (:class:`ConfigError` unless told) with the one wording of a bad choice,
    ``"{name} must be one of [...], got {value!r}"`` (then ``"; {hint}"`` if given), unless
    ``value`` is in ``allowed`` (a sequence, or a registry dict: its names, in the order given)."""
    choices = list(allowed)
    try:
        ok = value in choices
    except TypeError:  # pragma: no cover - a value that cannot be compared is not a choice
        ok = False
    if not ok:
        raise error(f"{name} must be one of {choices}, got {value!r}" + (f"; {hint}" if hint else ""))
