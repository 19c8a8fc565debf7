"""Helpers shared by the tests: paths, synthetic volumes and masks, a local HTTP server, workflow and SLURM runners.

Importable as ``helpers`` with ``tests/`` on the import path (``pythonpath = ["tests"]`` in pyproject's pytest options).
"""
