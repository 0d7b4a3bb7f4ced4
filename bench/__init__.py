"""Benchmark harness for the LLM OS worker: seeded workloads, baselines, metrics and the report.

`python -m bench.run --out docs` (the Makefile's `make bench`) runs every workload against this
worker, Hugging Face `generate` and llama.cpp on the same requests, measures the machine's
roofline in the same run, and writes `docs/bench/results.json`, `docs/bench/chart.png` and
`docs/benchmarks.md`. Benchmarks report; they never assert timings.
"""
