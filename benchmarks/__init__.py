"""shardax benchmarks: the harness behind ``scripts/benchmark.py`` (not part of the library).

Modules:

* ``benchmarks.suites``: the ``seed``, ``models`` and ``solver`` suites, one fresh process per
  case (``python -m benchmarks._run CASE_JSON``), results as JSON, Markdown and a chart.
* ``benchmarks.pmap_baseline``: the plain ``jax.pmap`` data-parallel step that
  ``parallel.parallelize`` is compared against.
* ``benchmarks.checkpoint_cost``: what saving a checkpoint every step costs a training loop.

Nothing in ``trainer``, ``parallel`` or ``models`` imports this package; it imports them.
"""
