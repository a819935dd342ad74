"""``spec_field``: a dataclass field that carries its own CLI help, short flag and choices, and the
one generator that turns such fields into ``argparse`` flags and back into dataclass values.

Config dataclasses of every layer declare their user-facing fields with :func:`spec_field`; the run
spec (:mod:`steadylm.train.spec`), the lab's options (:mod:`steadylm.lab.options`) and the
benchmarks (:mod:`steadylm.bench`) all build their flags with :func:`add_field_flags` and read them
back with :func:`fields_from_args`, so a field's flag, type, choices, help and default are written
once, on the field. A "quick" preset is a dict of field values passed as ``defaults``.

Like :mod:`steadylm.errors`, importable from any layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from steadylm.errors import ConfigError

__all__ = ["add_field_flags", "field_default", "fields_from_args", "parse_value", "shown", "spec_field",
           "type_name", "unwrap_optional"]


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


# ----------------------------------------------------------------------------------------------
# typed values
# ----------------------------------------------------------------------------------------------


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``; ``(tp, False)`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


_TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
               dict: "a table", list: "a list"}


def type_name(tp: Any) -> str:
    """``an integer``, ``a number or null``: what a value of type ``tp`` must be, in words."""
    base, optional = unwrap_optional(tp)
    origin = typing.get_origin(base) or base
    name = _TYPE_WORDS.get(origin, f"a {getattr(base, '__name__', str(base))}")
    return f"{name} or null" if optional else name


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse the string ``raw`` (from ``--set`` or a flag) as the type ``tp`` of field ``key``."""
    base, optional = unwrap_optional(tp)
    text = raw.strip()
    if optional and text.lower() in ("null", "none", ""):
        return None
    try:
        if base is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        if base is str:
            return raw
        return json.loads(text)  # dicts, lists, unions of several types
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"{key} must be {type_name(tp)}, got {raw!r}") from None


# ----------------------------------------------------------------------------------------------
# flags
# ----------------------------------------------------------------------------------------------


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The field's default (its factory called), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple)


def _item_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return args[0] if args else str


def _flag_parser(flag: str, tp: Any) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            if _is_list(tp):
                values = [parse_value(flag, part.strip(), _item_type(tp)) for part in raw.split(",") if part.strip()]
                if not values:
                    raise ConfigError(f"{flag} needs at least one value, got {raw!r}")
                return values
            return parse_value(flag, raw, tp)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def shown(value: Any) -> str:
    """A default as ``--help`` shows it (lists comma-separated, as they are typed)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return repr(value)


def add_field_flags(
    group: Any,
    cls: type,
    *,
    dest: Callable[[str], str],
    help_text: Callable[[dataclasses.Field[Any], Any], str] | None = None,
    hints: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
) -> list[dataclasses.Field[Any]]:
    """A flag for every field of the dataclass ``cls`` that has ``spec_field(flag=...)``, added to
    ``group`` (a parser or an argument group); returns the fields that got one.

    Each flag parses to the field's type (``int``, ``float``, ``str``; ``list[T]`` as
    comma-separated ``T`` values; ``bool`` as ``--x/--no-x``), offers the field's choices (a
    callable is evaluated now, so registries are read as they are) and defaults to None, so that
    :func:`fields_from_args` can tell "not given" from a value. ``dest(name)`` names the
    ``argparse`` destination; ``defaults`` (field name -> value, e.g. a protocol's or a preset's)
    replace the field defaults shown in the help; ``help_text(field, default)`` words the help
    (default: the field's help and ``(default X)``).
    """
    hints = hints if hints is not None else typing.get_type_hints(cls)
    defaults = defaults or {}
    added = []
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag")
        if not flag or f.name in exclude:
            continue
        default = defaults.get(f.name, field_default(f))
        text = help_text(f, default) if help_text else f"{f.metadata['help']} (default {shown(default)})"
        kwargs: dict[str, Any] = {"dest": dest(f.name), "default": None, "help": text}
        base, _ = unwrap_optional(hints[f.name])
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices is not None and not _is_list(base):
            kwargs["choices"] = list(choices)
        else:
            kwargs["type"] = _flag_parser(flag, base)
            kwargs["metavar"] = "A,B,..." if _is_list(base) else (
                base.__name__.upper() if isinstance(base, type) else "VALUE")
        group.add_argument(flag, **kwargs)
        added.append(f)
    return added


def fields_from_args(args: argparse.Namespace, cls: type, *, dest: Callable[[str], str],
                     defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Field values of ``cls`` from parsed flags (:func:`add_field_flags`): what the user gave,
    else ``defaults`` (e.g. a quick preset); fields given neither are left out (their dataclass
    default applies)."""
    defaults = defaults or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, dest(f.name), None)
        if given is not None:
            values[f.name] = given
        elif f.name in defaults:
            values[f.name] = defaults[f.name]
    return values
