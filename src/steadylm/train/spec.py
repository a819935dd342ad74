"""The run spec: one description of a training run, and the flags and config-file keys made from it.

A run is five sections, each a dataclass::

    model     ModelSpec       preset + ModelConfig overrides
    train     TrainConfig     optimizer, schedule, precision, checkpoints
    data      DataSpec        corpus, tokenizer, context length
    probes    ProbeSpec       stability probes and the spike detector
    parallel  ParallelConfig  none / ddp / fsdp and their options

Everything a user can set comes from the fields, once:

* a config file (TOML or JSON) has one table per section whose keys are the field names;
* ``--set section.key=VALUE`` sets any field (VALUE parsed by the field's type);
* a field whose metadata has ``flag`` (see :func:`spec_field`) also gets that short flag, with
  its help text, type and choices (choices come from the registries, never a copied list).

Precedence: defaults < ``--config`` file < ``--set`` < short flags. Every error names the key
(``train.lr``) and the allowed values; the same input gives the same error on every rank because
parsing happens before any process group exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steadylm.config_fields import add_field_flags, parse_value, spec_field, type_name, unwrap_optional
from steadylm.distributed.config import ParallelConfig
from steadylm.errors import ConfigError, check_choice
from steadylm.train.config import TrainConfig

__all__ = [
    "SECTIONS",
    "DataSpec",
    "ModelSpec",
    "ProbeSpec",
    "RunSpec",
    "add_spec_arguments",
    "user_assignments",
    "parse_value",
    "spec_field",
    "spec_from_args",
]


# ----------------------------------------------------------------------------------------------
# sections besides TrainConfig and ParallelConfig
# ----------------------------------------------------------------------------------------------


def _presets() -> Sequence[str]:
    from steadylm.models import PRESETS

    return list(PRESETS)


def _activations() -> Sequence[str]:
    from steadylm.nn import ACTIVATIONS

    return sorted(ACTIVATIONS)


def _norms() -> Sequence[str]:
    from steadylm.models.forms import block_form_names

    return list(block_form_names())


def _impls() -> Sequence[str]:
    from steadylm.models.config import IMPLS

    return list(IMPLS)


@dataclass
class ModelSpec:
    """A preset plus ``ModelConfig`` overrides. ``vocab_size`` defaults to the tokenizer's and
    ``max_seq_len`` to ``data.seq_len``; any other ``ModelConfig`` field may be set in
    ``overrides`` (config file: a key of the ``[model]`` table; CLI: ``--set model.KEY=VALUE``)."""

    preset: str = spec_field("nano", help="model preset (see `steadylm params`)", flag="--preset",
                             choices=_presets)
    activation: str | None = spec_field(None, help="FFN activation (default: the preset's)",
                                        flag="--activation", choices=_activations)
    norm: str | None = spec_field(None, help="block norm form (default: the preset's)", flag="--norm",
                                  choices=_norms)
    impl: str | None = spec_field(None, help="op implementation: fused kernels or reference math "
                                  "(default: the preset's)", flag="--impl", choices=_impls)
    init_from: str | None = spec_field(None, help="start from the weights of a local HF checkpoint "
                                       "(Llama/Mistral/Qwen2/Qwen3) or steadylm run directory; its "
                                       "shape replaces the preset's; --activation/--norm switch it",
                                       flag="--init-from")
    overrides: dict[str, Any] = spec_field(default_factory=dict, help="other ModelConfig fields")

    def validate(self) -> None:
        from steadylm.models import PRESETS, ModelConfig

        check_choice("model.preset", self.preset, PRESETS)
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - names)
        if unknown:
            raise ConfigError(f"unknown model key(s) {['model.' + k for k in unknown]}; "
                              f"model keys are preset and the ModelConfig fields {sorted(names)}")

    def build(self, vocab_size: int, seq_len: int) -> Any:
        """The validated ``ModelConfig`` for a tokenizer of ``vocab_size`` and context ``seq_len``."""
        from steadylm.models import ModelConfig

        fields: dict[str, Any] = {"vocab_size": vocab_size, "max_seq_len": seq_len}
        for name in ("activation", "norm", "impl"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        fields.update(self.overrides)
        try:
            return ModelConfig.from_preset(self.preset, **fields)
        except ConfigError as err:
            raise ConfigError(f"model: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset}
        for name in ("activation", "norm", "impl", "init_from"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update(self.overrides)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        own = {f.name for f in dataclasses.fields(cls)} - {"overrides"}
        spec = cls(**{k: v for k, v in data.items() if k in own},
                   overrides={k: v for k, v in data.items() if k not in own})
        _check_types("model", spec, exclude=("overrides",))
        spec.validate()
        return spec


@dataclass
class DataSpec:
    """The corpus and how it becomes token windows."""

    path: str | None = spec_field(None, help="corpus: a text file, a directory of text files, "
                                  "JSON-lines, or a directory written by `steadylm data prepare`; "
                                  "default: the embedded King James Bible", flag="--data")
    tokenizer: str | None = spec_field(None, help="a tokenizer.json to use instead of training a "
                                       "byte-level BPE on the corpus", flag="--tokenizer")
    vocab_size: int = spec_field(4096, help="vocabulary of the trained byte-level BPE",
                                 flag="--vocab-size")
    seq_len: int = spec_field(128, help="training context length (tokens per sequence)",
                              flag="--seq-len")
    text_field: str = spec_field("text", help="JSON-lines / Parquet field holding the text",
                                 flag="--text-field")
    val_fraction: float = spec_field(0.05, help="share of the corpus held out for validation")
    split_seed: int | None = spec_field(None, help="seed of the train/validation split "
                                        "(default: train.seed)")

    def validate(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be an integer >= 1, got {self.seq_len!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 256:
            raise ConfigError(f"data.vocab_size must be an integer >= 256, got {self.vocab_size!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0):
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.split_seed is not None and (not isinstance(self.split_seed, int) or self.split_seed < 0):
            raise ConfigError(f"data.split_seed must be an integer >= 0, got {self.split_seed!r}")
        for name in ("path", "tokenizer"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"data.{name}: {value} does not exist")


@dataclass
class ProbeSpec:
    """What the run measures besides loss (SPEC §5); sampled every ``train.probe_every`` steps."""

    stability: bool = spec_field(False, help="log the stability statistics (FFN outliers, hidden "
                                 "variance, tanh saturation, BHyT v' vs mean(h²))", flag="--probes")
    grad_stats: bool = spec_field(True, help="the stability probe also records gate/up gradients")
    fp8: bool = spec_field(True, help="with FP8 precision, log the FP8 counters (overflow, "
                           "underflow, amax, SNR)")
    spike_window: int = spec_field(20, help="loss-spike detector: steps the z-score is measured against")
    spike_threshold: float = spec_field(4.0, help="loss-spike detector: z-score that counts as a spike")

    def validate(self) -> None:
        if isinstance(self.spike_window, bool) or not isinstance(self.spike_window, int) or self.spike_window < 2:
            raise ConfigError(f"probes.spike_window must be an integer >= 2, got {self.spike_window!r}")
        if not (isinstance(self.spike_threshold, (int, float)) and math.isfinite(self.spike_threshold)
                and self.spike_threshold > 0):
            raise ConfigError(f"probes.spike_threshold must be a number > 0, got {self.spike_threshold!r}")


#: section name -> dataclass (the order of the config file and of ``--help``).
SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "train": TrainConfig,
    "data": DataSpec,
    "probes": ProbeSpec,
    "parallel": ParallelConfig,
}


# ----------------------------------------------------------------------------------------------
# values: typed parsing of strings, type checks of file values
# ----------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    import steadylm.distributed.config as dist_config
    import steadylm.train.config as train_config

    namespace = {**vars(train_config), **vars(dist_config), **globals()}
    return typing.get_type_hints(cls, globalns=namespace)


def _matches(value: Any, tp: Any) -> bool:
    base, optional = unwrap_optional(tp)
    if value is None:
        return optional
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    origin = typing.get_origin(base) or base
    if origin in (dict, list, tuple):
        return isinstance(value, origin)
    return True  # unions of several types: the section's own validate() decides


def _check_types(section: str, obj: Any, exclude: Sequence[str] = ()) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in exclude:
            continue
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{section}.{f.name} must be {type_name(hints[f.name])}, got {value!r}")


def _build_section(name: str, values: Mapping[str, Any]) -> Any:
    cls = SECTIONS[name]
    if cls is ModelSpec:
        return ModelSpec.from_dict(values)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {name} key(s) {[name + '.' + k for k in unknown]}; "
                          f"{name} keys are {names}")
    hints = _hints(cls)
    for key, value in values.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"{name}.{key} must be {type_name(hints[key])}, got {value!r}")
    try:
        obj = cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None
    if hasattr(obj, "validate") and cls is not TrainConfig:  # TrainConfig validates in __post_init__
        obj.validate()
    return obj


# ----------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """Everything that defines one training run (see the module docstring)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSpec = field(default_factory=DataSpec)
    probes: ProbeSpec = field(default_factory=ProbeSpec)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS if name != "model"}
        return {"model": self.model.to_dict(), **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> RunSpec:
        """Build from nested sections; unknown sections or keys raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a table of sections {list(SECTIONS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown} in {source}; sections are {list(SECTIONS)}")
        sections = {}
        for name in SECTIONS:
            values = data.get(name, {})
            if not isinstance(values, Mapping):
                raise ConfigError(f"{source}: section {name!r} must be a table of keys, got {values!r}")
            sections[name] = _build_section(name, values)
        spec = cls(**sections)
        # Model fields are checked against each other now, before any corpus is tokenized (the
        # tokenizer's vocabulary, known later, can only be smaller than data.vocab_size).
        spec.model.build(spec.data.vocab_size, spec.data.seq_len)
        return spec

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunSpec:
        """Read a TOML (``.toml``) or JSON config file."""
        return cls.from_dict(read_config_file(path), source=str(path))

    def with_overrides(self, assignments: Mapping[str, Any]) -> RunSpec:
        """A validated copy with ``{"section.key": value}`` applied (values already typed)."""
        data = self.to_dict()
        for key, value in assignments.items():
            section, sep, name = key.partition(".")
            if not sep or section not in SECTIONS or not name:
                raise ConfigError(f"unknown key {key!r}: keys are SECTION.FIELD with SECTION in {list(SECTIONS)}")
            data[section][name] = value
        return RunSpec.from_dict(data)

    def model_config(self, vocab_size: int) -> Any:
        """The ``ModelConfig`` for a tokenizer of ``vocab_size``."""
        return self.model.build(vocab_size, self.data.seq_len)

    @property
    def split_seed(self) -> int:
        return self.train.seed if self.data.split_seed is None else self.data.split_seed


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file as nested dicts; a missing or unparsable file raises :class:`ConfigError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror or err}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(raw.decode("utf-8"))
        if path.suffix.lower() == ".json":
            return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"--config {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    raise ConfigError(f"--config {path}: the file must end in .toml or .json")


# ----------------------------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------------------------


def _flag_fields() -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(section, field, type) of every field that has a short flag."""
    out = []
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag"):
                out.append((section, f, hints[f.name]))
    return out


def _dest(section: str, name: str) -> str:
    return f"spec__{section}__{name}"


def add_spec_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = ()) -> None:
    """``--config``, ``--set`` and the short flags of every section (from the fields' metadata).

    ``exclude``: sections (``"parallel"``) or fields (``"model.activation"``) that get no short
    flag, for a command that sets them itself (the lab sets each variant's activation)."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="run spec file (TOML or JSON): one table per section "
                        f"({', '.join(SECTIONS)}) whose keys are the field names")
    parser.add_argument("--set", dest="spec_set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any field of the run spec, e.g. --set model.n_layers=6 "
                        "--set train.weight_decay=0 (repeatable)")
    for section, cls in SECTIONS.items():
        if section in exclude:
            continue
        group = parser.add_argument_group(section, _first_sentence(cls.__doc__ or ""))
        add_field_flags(
            group, cls, hints=_hints(cls), dest=lambda name, section=section: _dest(section, name),
            help_text=lambda f, default, section=section: f"{f.metadata['help']} [{section}.{f.name}; default {default!r}]",
            exclude=[key.partition(".")[2] for key in exclude if key.startswith(section + ".")],
        )


def _first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "." if paragraph else ""


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.n_layers=6"]`` -> typed ``{"train.lr": 0.001, ...}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        if section not in SECTIONS:
            raise ConfigError(f"--set {key}: unknown section {section!r}; sections are {list(SECTIONS)}")
        cls = SECTIONS[section]
        hints = _hints(cls)
        if name in hints and name != "overrides":
            out[key] = parse_value(key, raw, hints[name])
        elif cls is ModelSpec:
            out[key] = _parse_model_value(key, name, raw)
        else:
            raise ConfigError(f"--set {key}: unknown key; {section} keys are "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
    return out


def _parse_model_value(key: str, name: str, raw: str) -> Any:
    from steadylm.models import ModelConfig
    import steadylm.models.config as model_config

    hints = typing.get_type_hints(ModelConfig, globalns=vars(model_config))
    if name not in hints:
        raise ConfigError(f"--set {key}: unknown key; model keys are preset and the ModelConfig "
                          f"fields {sorted(hints)}")
    return parse_value(key, raw, hints[name])


def user_assignments(args: argparse.Namespace) -> dict[str, Any]:
    """What the user set in parsed arguments, as ``{"section.key": value}`` with the usual
    precedence (``--config`` file < ``--set`` < short flags), so that a command can build its own
    base spec around them (e.g. derive ``train.min_lr`` from ``train.lr`` only where the user gave
    none) and then apply them with :meth:`RunSpec.with_overrides`."""
    out: dict[str, Any] = {}
    if getattr(args, "config", None):
        data = read_config_file(args.config)
        if not isinstance(data, Mapping):
            raise ConfigError(f"--config {args.config} must be a table of sections {list(SECTIONS)}")
        for section, values in data.items():
            if section not in SECTIONS or not isinstance(values, Mapping):
                raise ConfigError(f"--config {args.config}: unknown section or not a table: {section!r}; "
                                  f"sections are {list(SECTIONS)}")
            out.update({f"{section}.{name}": value for name, value in values.items()})
    out.update(parse_assignments(getattr(args, "spec_set", []) or []))
    for section, f, _ in _flag_fields():
        value = getattr(args, _dest(section, f.name), None)
        if value is not None:
            out[f"{section}.{f.name}"] = value
    return out


def spec_from_args(args: argparse.Namespace, base: RunSpec | None = None) -> RunSpec:
    """The run spec of parsed arguments: ``base`` (or defaults) < ``--config`` < ``--set`` < flags."""
    spec = RunSpec.load(args.config) if getattr(args, "config", None) else (base or RunSpec())
    assignments = parse_assignments(getattr(args, "spec_set", []) or [])
    for section, f, _ in _flag_fields():
        value = getattr(args, _dest(section, f.name), None)
        if value is not None:
            assignments[f"{section}.{f.name}"] = value
    steps = assignments.get("train.steps")
    if isinstance(steps, int) and "train.warmup_steps" not in assignments and spec.train.warmup_steps > steps:
        # A shorter run than the spec's warm-up: warm up over its first tenth instead of refusing.
        assignments["train.warmup_steps"] = steps // 10
    return spec.with_overrides(assignments) if assignments else spec
