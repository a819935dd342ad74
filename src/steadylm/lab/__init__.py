"""The lab: train variants one process at a time, measure, report.

One core, small protocol modules on top of it:

- :mod:`steadylm.lab.options` — the lab's flags: the run spec's (generated once in
  :mod:`steadylm.train.spec`), the lab's own option dataclasses, the variants.
- :mod:`steadylm.lab.runner` — :func:`~steadylm.lab.runner.run_variant`: a run spec and a run
  directory in, a :class:`~steadylm.lab.runner.RunResult` out (resumable, finished runs re-read).
- :mod:`steadylm.lab.summary` — :class:`~steadylm.lab.summary.RunSummary`: spikes, divergence,
  outliers, FP8 counters, dead — each defined once.
- :mod:`steadylm.lab.plots` — every figure; :mod:`steadylm.lab.report` — the HTML + markdown writer.
- Protocols: :mod:`~steadylm.lab.compare`, :mod:`~steadylm.lab.lr_sweep`, :mod:`~steadylm.lab.switch`,
  :mod:`~steadylm.lab.fp8` (the last three under ``steadylm stress``, :mod:`~steadylm.lab.stress`),
  and :mod:`~steadylm.lab.ladder`.

Metric keys are built and parsed by :mod:`steadylm.probes.keys`.
"""
