"""Train one lab run: a :class:`~steadylm.train.spec.RunSpec` and a run directory in, a
:class:`RunResult` out. One process; the data, the probes and the Trainer come from
:func:`steadylm.train.assemble.build_run`, exactly as ``steadylm train`` builds them.

A finished run leaves ``result.json`` (its spec, parameter counts, tokens, timings, the trainer's
stop reason) next to its ``metrics.jsonl``; with ``resume`` a run whose ``result.json`` matches
its spec is re-read instead of retrained, and an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steadylm.distributed.env import DistEnv
from steadylm.errors import RunPreempted
from steadylm.lab.options import Variant
from steadylm.lab.summary import RunSummary, summarize
from steadylm.train.assemble import build_data, build_run, stability_probe
from steadylm.train.atomic import atomic_write_text
from steadylm.train.spec import RunSpec

__all__ = ["RESULT_FILE", "SAMPLES_FILE", "RunResult", "SharedJob", "is_finished", "load_data", "run_shared",
           "run_variant", "variant_spec"]

RESULT_FILE = "result.json"
SAMPLES_FILE = "bhyt_variance_samples.json"


@dataclass
class RunResult:
    """One trained (or re-read) run."""

    label: str  # the name the report shows (a variant name, "switch to powlu", "swiglu fp8" ...)
    variant: Variant
    run_dir: Path
    spec: RunSpec
    rows: list[dict[str, Any]]
    summary: RunSummary
    params: dict[str, int] = field(default_factory=dict)  # total / active / embedding
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    reused: bool = False  # re-read from a finished run directory, not trained now

    @property
    def name(self) -> str:
        return self.label


def load_data(spec: RunSpec) -> Any:
    """The token data of ``spec.data``, as ``steadylm train`` builds it
    (:func:`steadylm.train.assemble.build_data`: ``data.tokenizer`` or a cached byte-level BPE)."""
    return build_data(spec)


def variant_spec(spec: RunSpec, variant: Variant, **changes: Any) -> RunSpec:
    """``spec`` with the variant's activation and norm (and ``{"section.key": value}`` changes)."""
    return spec.with_overrides({"model.activation": variant.activation, "model.norm": variant.norm,
                                **changes})


def output_lock(out: str | Path) -> AbstractContextManager[Any]:
    """One writer per lab output directory: a second protocol on ``out`` refuses at once (the
    trainer also locks each run directory). Under torchrun only rank 0 holds it; the other ranks
    write only the run directories they train."""
    from steadylm.train.lock import RunDirLock

    return RunDirLock(out) if DistEnv.from_launcher().is_main else nullcontext()


def is_finished(run_dir: Path, spec: RunSpec) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``spec``."""
    try:
        saved = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return saved.get("spec") == json.loads(json.dumps(spec.to_dict(), default=str))


def run_variant(
    spec: RunSpec,
    run_dir: str | Path,
    data: Any,
    *,
    label: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    extra_probes: Sequence[Any] = (),
    fp8_per_module: bool = False,
    console: Any = None,
) -> RunResult:
    """Train ``spec`` into ``run_dir`` and summarise it.

    ``resume``: a finished run of the same spec is re-read (not retrained); an interrupted one
    continues from its checkpoint; otherwise the run starts fresh. ``stop_after``: end after that
    step with a checkpoint (the LR schedule still spans ``train.steps``); such a run is not
    finished and leaves no ``result.json``. A run the trainer stopped on a non-finite value is a
    result (its summary says diverged), not an error.
    """
    from steadylm.train.metrics import read_metrics

    run_dir = Path(run_dir)
    variant = Variant(spec.model.activation or "", spec.model.norm or "")
    label = label or variant.name
    if resume and stop_after is None and is_finished(run_dir, spec):
        return _reread(spec, run_dir, variant, label)
    trainer = build_run(spec, run_dir, data=data, extra_probes=extra_probes, fp8_per_module=fp8_per_module)
    stability = stability_probe(trainer)
    t0 = time.perf_counter()
    result = trainer.run(resume="auto" if resume else False, stop_after=stop_after)
    wall = time.perf_counter() - t0
    if result.preempted_at is not None:
        # the protocol stops here; its --resume continues this run from the checkpoint just written
        raise RunPreempted(f"preempted by {result.preempt_signal} at step {result.preempted_at} of {run_dir}: "
                           "checkpoint written; rerun the same command with --resume")
    if result.diverged and console is not None:
        console.print(f"[red]{label}: diverged at step {result.diverged_at}: {result.divergence_reason}[/red]")
    samples = stability.samples if stability is not None else {}
    samples_path = run_dir / SAMPLES_FILE
    if samples:
        atomic_write_text(samples_path, json.dumps(samples))
    elif resume and samples_path.exists():
        samples = json.loads(samples_path.read_text(encoding="utf-8"))
    facts = {
        "params": {k: int(v) for k, v in result.num_params.items()},
        "tokens_seen": int(result.tokens_seen),
        "tokens_per_s": float(result.tokens_per_s),
        "wall_s": wall,
        "stopped": None if result.diverged_at is None else [result.diverged_at, result.divergence_reason],
        "steps_done": result.steps_done,
    }
    # finished = every step trained, or stopped by a divergence (never a run cut short otherwise)
    if result.diverged or (stop_after is None and result.steps_done == spec.train.steps):
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(
            {"spec": spec.to_dict(), **facts}, indent=1, default=str))
    return _result(spec, run_dir, variant, label, read_metrics(result.metrics_jsonl), facts, samples)


class SharedJob(Protocol):
    """What :func:`run_shared` needs of a job: its spec, its run directory and its report label."""

    spec: RunSpec
    run_dir: Path

    @property
    def label(self) -> str: ...


def run_shared(
    jobs: Sequence[SharedJob],
    data: Any,
    *,
    resume: bool,
    env: DistEnv,
    extra_probes: Callable[[Any], Sequence[Any]] | None = None,
    announce: Callable[[Any, bool], None] | None = None,
    tag: str = "lab",
    poll_s: float = 5.0,
) -> dict[int, RunResult]:
    """Ranks take whole runs: this rank (``env``: the launcher's layout, no process group) trains
    jobs ``env.rank, env.rank + world, ...``, then waits until every job has its ``result.json``
    and returns all results by job index (the other ranks' re-read from their directories).

    ``extra_probes(job)``: probes besides the usual ones; ``announce(job, reused)``: called before
    each of this rank's jobs (``reused``: finished and re-read under ``resume``).
    """
    results: dict[int, RunResult] = {}
    for i, job in enumerate(jobs):
        if i % env.world_size != env.rank:
            continue
        if announce is not None:
            announce(job, resume and is_finished(job.run_dir, job.spec))
        extra = list(extra_probes(job)) if extra_probes is not None else []
        results[i] = run_variant(job.spec, job.run_dir, data, label=job.label, resume=resume, extra_probes=extra)
    waiting = [i for i in range(len(jobs)) if i not in results]
    last_note = time.monotonic()
    while waiting:
        waiting = [i for i in waiting if not is_finished(jobs[i].run_dir, jobs[i].spec)]
        if waiting:
            if time.monotonic() - last_note > 60:
                print(f"{tag}[{env.rank}/{env.world_size}]: waiting for {len(waiting)} run(s) of other ranks",
                      flush=True)
                last_note = time.monotonic()
            time.sleep(poll_s)
    for i, job in enumerate(jobs):
        if i not in results:
            results[i] = run_variant(job.spec, job.run_dir, data, label=job.label, resume=True)
    return results


def _reread(spec: RunSpec, run_dir: Path, variant: Variant, label: str) -> RunResult:
    from steadylm.train.metrics import read_metrics

    facts = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
    samples_path = run_dir / SAMPLES_FILE
    samples = json.loads(samples_path.read_text(encoding="utf-8")) if samples_path.exists() else {}
    res = _result(spec, run_dir, variant, label, read_metrics(run_dir / "metrics.jsonl"), facts, samples)
    res.reused = True
    return res


def _result(spec: RunSpec, run_dir: Path, variant: Variant, label: str, rows: list[dict[str, Any]],
            facts: dict[str, Any], samples: dict[str, Any]) -> RunResult:
    params = facts["params"]
    stopped = facts.get("stopped")
    summary = summarize(
        rows, variant=label, activation=variant.activation, norm=variant.norm,
        spike_window=spec.probes.spike_window, spike_threshold=spec.probes.spike_threshold,
        stopped=None if not stopped else (stopped[0], stopped[1]),
        tokens_per_step=spec.train.batch_size * spec.data.seq_len,
        params_total=int(params["total"]), params_active=int(params.get("active", params["total"])),
        tokens_seen=int(facts["tokens_seen"]), tokens_per_s=float(facts["tokens_per_s"]),
        wall_s=float(facts.get("wall_s", math.nan)), lr=spec.train.lr, precision=spec.train.precision,
    )
    return RunResult(label=label, variant=variant, run_dir=run_dir, spec=spec, rows=rows, summary=summary,
                     params=params, samples=samples)
