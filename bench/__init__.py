"""hotloop's benchmark harness: workloads x training loops -> table, JSON, markdown and PNG.

Run it with ``python bench/run.py`` (see ``--help``); the demo is ``python bench/demo.py``.
"""
