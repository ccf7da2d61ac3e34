"""ESP scheduling policy: plan types, KV accounting, cost model, the scheduler.

Pure Python (numpy allowed): never imports torch, ray or triton (tests/test_purity.py).
"""
