"""Benchmarks of zizhu against peer engines on the same checkpoints and workload.

Modules here are imported by worker scripts running in the peers' own virtualenvs, so the package
and its shared modules (workload, model_math, report) use the standard library only.
"""
