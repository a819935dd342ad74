"""The lab: ``steadylm compare`` (train variants, measure, report) and the stress protocols.

- :mod:`steadylm.lab.compare` — the ``compare`` command.
- :mod:`steadylm.lab.report` — :class:`~steadylm.lab.report.Report`, the HTML + markdown writer.
- :mod:`steadylm.lab.plots` — the figures (matplotlib, no pyplot state, Agg rendering).
"""
