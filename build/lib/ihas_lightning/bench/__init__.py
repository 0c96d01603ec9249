"""Benchmarks: preprocessing, loader and training throughput (results in experiments/results/)."""
