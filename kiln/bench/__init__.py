"""``kiln bench``: offline latency, offline throughput and online serving benchmarks of an artifact on
the in-process serving engine. ``workload.py`` makes the seeded request sets and arrival times,
``runner.py`` runs the modes, ``metrics.py`` computes vLLM's serving metrics (pure), ``report.py``
prints and writes the results, ``plots.py`` draws them."""

from .runner import BenchConfig, engine_config, run_bench

__all__ = ["BenchConfig", "engine_config", "run_bench"]
