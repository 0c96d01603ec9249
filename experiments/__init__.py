"""The lab beside the framework: benchmarks, acceptance runs, tuning and the bad-input corpus.

Run from the repository root, e.g. ``python -m experiments.bench.bench_train`` (the Makefile targets do).
"""
