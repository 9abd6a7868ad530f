"""Benchmarks of celery_hilok, side by side with the seed library and the physical floor.

Run ``python -m benchmarks.run`` (or ``python3 dev.py bench``); see ``docs/benchmarks.md``.

Layout:

- :mod:`benchmarks.workloads`: the measurements themselves (standard library only), run
  unchanged against any lock library that has ``read(path)`` / ``write(path)`` async
  context managers, so both libraries are measured by the same code;
- :mod:`benchmarks.ours`: celery_hilok's side (AsyncHiLok in-process, HiLok on threads);
- :mod:`benchmarks.seed_bench`: the seed's side, run inside its own virtualenv
  (``benchmarks/.seed-venv``, built by :mod:`benchmarks.seed`) as a subprocess;
- :mod:`benchmarks.celery_bench`: no-op tasks through a real prefork worker;
- :mod:`benchmarks.contention`: issue 12's rows, the engine under contention (waiters
  elsewhere in the tree, drains, hot hand-off, memory, channels, SLOWLOG, big acquires);
- :mod:`benchmarks.report`: the table, ratios, targets and chart;
- :mod:`benchmarks.run`: the command line, which runs all of it against one redis-server.

This package must not import celery_hilok at import time: ``seed_bench`` imports
``benchmarks.workloads`` inside the seed's virtualenv, where celery_hilok is not installed.
"""
