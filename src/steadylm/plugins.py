"""Third-party registrations: a plug-in is a Python module that, when imported, registers norms
(:func:`steadylm.nn.register_norm`), activations (:func:`steadylm.nn.register_activation`) or
block forms (:func:`steadylm.models.register_block_form`).

Every ``steadylm`` command loads the plug-ins named by ``--plugin MODULE`` (repeatable) and by the
environment variable ``STEADYLM_PLUGINS=mod1,mod2`` before it parses its flags, so the new names
appear in ``--help`` choices and validate like built-in ones. A model config that uses a plug-in's
names records the module (``"plugins"`` in ``ModelConfig.to_dict()``), and
``ModelConfig.from_dict`` imports it again: a checkpoint or an exported Hugging Face directory
loads in a process that was never told about the plug-in, as long as the module is importable.

Like :mod:`steadylm.errors`, importable from any layer (it imports no other steadylm module).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence

from steadylm.errors import ConfigError

__all__ = ["ENV_VAR", "load_plugins", "loaded_plugins", "plugins_from_argv"]

#: Environment variable with comma-separated plug-in modules.
ENV_VAR = "STEADYLM_PLUGINS"

_LOADED: list[str] = []


def load_plugins(modules: Iterable[str]) -> list[str]:
    """Import each plug-in module once; returns the modules imported by this call.

    Raises:
        ConfigError: a module that cannot be imported (naming it and the cause).
    """
    done = []
    for name in modules:
        name = name.strip()
        if not name or name in _LOADED:
            continue
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"plug-in {name!r} cannot be imported: {err}") from None
        _LOADED.append(name)
        done.append(name)
    return done


def is_plugin_module(module: str) -> bool:
    """Whether ``module`` (where a registered name is defined) lies outside steadylm."""
    return module != "steadylm" and not module.startswith("steadylm.")


def loaded_plugins() -> tuple[str, ...]:
    """The plug-in modules loaded so far, in order."""
    return tuple(_LOADED)


def plugins_from_argv(argv: Sequence[str], environ: dict[str, str] | None = None) -> list[str]:
    """The plug-ins a command line asks for: ``$STEADYLM_PLUGINS`` first, then every
    ``--plugin MODULE`` / ``--plugin=MODULE`` (read before the parser exists, so that the
    registrations shape it)."""
    env = os.environ if environ is None else environ
    names = [m for m in env.get(ENV_VAR, "").split(",") if m.strip()]
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--plugin" and i + 1 < len(args):
            names.append(args[i + 1])
        elif arg.startswith("--plugin="):
            names.append(arg.split("=", 1)[1])
    return names
