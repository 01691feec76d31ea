"""Benchmarks: Dispatcher's worker and API against plain RQ, RQ SimpleWorker and Celery.

Run `python -m bench.run` (see docs/benchmarks.md). Everything runs on loopback, on free ports,
in temporary directories, and is stopped at the end.
"""
