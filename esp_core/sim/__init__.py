"""Discrete-event simulator of an ESP group, baselines, workloads, metrics and sweeps.

Pure Python + numpy (+ matplotlib/tqdm, imported lazily): never torch, ray or triton
(tests/test_purity.py). Entry points: `Simulator` (simulator.py), `generate` /
`read_trace` (workloads.py), `summarize` (metrics.py), `sweep` (sweep.py),
`build_scheduler` (policies.py), and the CLI `python -m esp_core.sim`.
"""
