"""One run assembly: a :class:`~steadylm.train.spec.RunSpec` and a run directory in, a ready
:class:`~steadylm.train.trainer.Trainer` out.

::

    trainer = build_run(spec, "runs/x", callbacks=[tracker])
    result = trainer.run(resume="auto", stop_after=None)

Every command that trains goes through :func:`build_run` — ``steadylm train``, the lab's protocols
(``compare``, ``stress``, ``ladder``, one process per run), the model benchmark and the scale-out
benchmark — so the data, the probes, the model config, ``--init-from`` and the Trainer's options
are decided here and nowhere else:

* data: :func:`build_data` (``data.tokenizer``, or the ``--init-from`` directory's
  ``tokenizer.json``, else a byte-level BPE trained on the corpus and cached);
* probes: :func:`build_probes` (the stability probe with ``probes.stability``, FP8 counters with
  FP8 precision on the steadylm backend; every ``train.probe_every`` steps);
* the model: the preset + overrides of ``spec.model`` for the tokenizer's vocabulary, or the
  imported config and weights of ``model.init_from`` (:mod:`steadylm.train.init_from`);
* the Trainer: ``spec.train``, ``spec.parallel``, the caller's callbacks and the experiment
  trackers of ``train.trackers`` (:mod:`steadylm.train.trackers`), and the whole spec in
  ``config.json`` (``run_spec``), so ``--resume`` can reuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steadylm.distributed.env import DistEnv
from steadylm.train.spec import RunSpec
from steadylm.train.trackers import tracker_callback
from steadylm.train.trainer import Trainer

__all__ = ["RUN_SPEC_KEY", "build_data", "build_probes", "build_run", "init_weights", "stability_probe",
           "with_init_tokenizer"]

#: Key of config.json (and of a checkpoint's configs) that holds the whole run spec.
RUN_SPEC_KEY = "run_spec"


def with_init_tokenizer(spec: RunSpec) -> RunSpec:
    """``spec`` with ``data.tokenizer`` set to the ``model.init_from`` directory's tokenizer when
    the spec names none (the data must be encoded with the weights' vocabulary)."""
    if spec.model.init_from is None or spec.data.tokenizer is not None:
        return spec
    from steadylm.train.model_dir import tokenizer_file_of

    tokenizer = tokenizer_file_of(spec.model.init_from)
    return spec if tokenizer is None else spec.with_overrides({"data.tokenizer": str(tokenizer)})


def build_data(spec: RunSpec) -> Any:
    """The token data of ``spec.data`` (memory-mapped when it names a prepared directory), encoded
    with the ``--init-from`` tokenizer when the spec names no other."""
    from steadylm.data import prepare_data

    spec = with_init_tokenizer(spec)
    d = spec.data
    return prepare_data(d.path, vocab_size=d.vocab_size, seq_len=d.seq_len, val_fraction=d.val_fraction,
                        seed=spec.split_seed, text_field=d.text_field, tokenizer=d.tokenizer)


def build_probes(spec: RunSpec, *, fp8_per_module: bool = False) -> list[Any]:
    """The probes ``spec.probes`` asks for, sampling every ``train.probe_every`` steps (none when
    ``probe_every`` is 0).

    Under DDP/FSDP2 every rank runs them (hooks are local and cheap); the stability statistics
    describe rank 0's rows of the batch (what rank 0 logs); FP8 counters are summed over ranks.
    ``fp8_per_module``: the FP8 probe also logs each linear's counters (the lab's FP8 protocol).
    """
    every = spec.train.probe_every
    if every < 1:
        return []
    probes: list[Any] = []
    if spec.probes.stability:
        from steadylm.probes import StabilityProbe

        probes.append(StabilityProbe(every=every, grad_stats=spec.probes.grad_stats))
    if spec.probes.fp8 and spec.train.precision == "fp8" and spec.train.fp8_backend == "steadylm":
        from steadylm.precision import FP8Probe

        probes.append(FP8Probe(every=every, per_module=fp8_per_module))
    return probes


def stability_probe(trainer: Trainer) -> Any:
    """The trainer's :class:`~steadylm.probes.StabilityProbe` (its BHyT variance samples), or None."""
    from steadylm.probes import StabilityProbe

    return next((p for p in trainer.probes if isinstance(p, StabilityProbe)), None)


def init_weights(spec: RunSpec) -> Any:
    """The imported weights of ``model.init_from`` (None without it), with the spec's activation,
    norm, impl, ModelConfig overrides and ``data.seq_len`` applied (shape-neutral changes only)."""
    m = spec.model
    if m.init_from is None:
        return None
    from steadylm.train.init_from import init_from

    changes = {name: getattr(m, name) for name in ("activation", "norm", "impl") if getattr(m, name) is not None}
    return init_from(m.init_from, max_seq_len=spec.data.seq_len, **changes, **m.overrides)


def build_run(
    spec: RunSpec,
    out: str | Path,
    *,
    data: Any = None,
    callbacks: Sequence[Any] = (),
    extra_probes: Sequence[Any] = (),
    fp8_per_module: bool = False,
    env: DistEnv | None = None,
    model_factory: Callable[[Any], Any] | None = None,
) -> Trainer:
    """The :class:`Trainer` of ``spec`` writing to ``out``; call ``.run(resume=, stop_after=)``.

    Args:
        data: token data already built by :func:`build_data` for this spec's data section (the lab
            trains many variants on one corpus); default: built here.
        callbacks: ``on_log(row)`` / ``on_checkpoint(step, path)`` observers (experiment trackers).
        extra_probes: probes besides :func:`build_probes`'s (a protocol's own measurement).
        fp8_per_module: see :func:`build_probes`.
        env: this process's rank layout (default: :meth:`DistEnv.current`, i.e. the process
            group ``torchrun`` set up, or one process).
        model_factory: builds the model from its config (default: ``build_model``, or the
            ``--init-from`` weights).
    """
    init = init_weights(spec)
    spec = with_init_tokenizer(spec)
    if data is None:
        data = build_data(spec)
    model_config = spec.model_config(data.vocab_size) if init is None else init.config
    if model_factory is None and init is not None:
        model_factory = init.factory
    tracker = tracker_callback(spec.train.trackers, out)  # train.trackers (--tracker); None without
    return Trainer(
        model_config, spec.train, data, out, [*build_probes(spec, fp8_per_module=fp8_per_module), *extra_probes],
        callbacks=[*callbacks, *([tracker] if tracker is not None else [])], parallel=spec.parallel,
        extra_configs={RUN_SPEC_KEY: spec.to_dict()},
        model_factory=model_factory, env=env,
    )
