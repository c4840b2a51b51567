"""Benchmarks of mu_runner against a plain PyTorch baseline (docs/benchmarks.md).

`python -m bench.cpu` (`make bench`): CPU throughput ratios, the evaluation's share of a run and
the trainings a sweep performs. `bench/gpu.sh`: the same throughput comparison on one GPU.
"""
