"""The model side of an elastic instance (torch): Llama-family decoder with injectable
attention, HF checkpoint loading, token-slot KV pool, sampling, and `InstanceWorker`,
which executes the single-instance part of IterationPlans.

Modules (import them directly; this package imports nothing so `config` stays torch-free):
config (ModelArch, WorkerConfig), rope, model (CausalLM, AttentionFn), builtin, weights,
kv_pool (KVPool), sampling, request_state, local_exec (prefill_local, decode_local),
worker (InstanceWorker). Test drivers and plan factories live in tests/support/
"""
