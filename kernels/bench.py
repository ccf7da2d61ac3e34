"""Attention kernel benchmark: one command on a GPU host, a smaller one on CPU.

    python -m esp_serve.kernels.bench                 # GPU: prefill TFLOP/s and decode bandwidth
    python -m esp_serve.kernels.bench --cpu           # the torch path on this machine's CPU
    python -m esp_serve.kernels.bench --quick         # fewer shapes (smoke run)
    python -m esp_serve.kernels.bench --json out.jsonl  # also append one JSON line per measurement
    python -m esp_serve.kernels.bench --cpu --threads 1  # CPU, one thread (stable on a shared host)

GPU prefill: causal attention of one sequence of 4K / 32K / 128K tokens, head_dim 128,
bf16, 32 query heads (8 kv heads for the GQA rows), TFLOP/s = 2 * 2 * D * (visible
score entries) * heads / time, for Triton (`kernels.triton_prefill`), torch SDPA with the
flash backend, and flash-attn's varlen kernel when installed. A striped ring step (P = 4,
strictly causal) shows the tile skipping of the global-position mask.
GPU decode: `slot_attention` over a slot pool, batch 1-256 x context 4K-1M (cases above
~16M pool tokens are skipped: they do not fit), slots in random order (the pool's worst
case), Hq 32 / Hkv 8 / D 128 bf16. Achieved bandwidth = K/V bytes read / time, against
the measured device-to-device copy bandwidth.
CPU: the torch path's prefill at 4K/16K and decode (fp32 by default, --dtype bf16),
GFLOP/s and GB/s, best of a few runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

GPU_PREFILL_LENS = (4096, 32768, 131072)
DECODE_BATCHES = (1, 16, 64, 256)
DECODE_CONTEXTS = (4096, 32768, 131072, 1048576)
MAX_POOL_TOKENS = 16 << 20


def _causal_flops(n_q: int, n_k_visible: float, heads: int, d: int) -> float:
    return 4.0 * n_q * n_k_visible * d * heads  # QK^T and PV, 2 flops per MAC


def _gpu_time_ms(fn) -> float:
    """Device time of fn (triton's do_bench: CUDA events, L2 flushed before each run). fn
    must not read a device tensor back: that wait would put host time between the events,
    so the kernel wrappers get their offsets as host copies (`HostSeqs`)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _cpu_time_ms(fn, reps: int = 1) -> float:
    """Best of `reps` after a warm-up: on a shared host the minimum is the least noisy."""
    fn()  # warm-up (allocator, op dispatch)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _emit(rows: list[dict], row: dict, sink):
    rows.append(row)
    print(
        " | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
    )
    if sink:
        sink.write(json.dumps(row) + "\n")
        sink.flush()


def copy_bandwidth_gbs(device="cuda", nbytes=4 << 30) -> float:
    """Measured peak: device-to-device copy of a large buffer (read + write bytes)."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ms = _gpu_time_ms(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_gpu_prefill(lens, sink, rows):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from esp_serve.kernels import flash_adapter, triton_prefill
    from esp_serve.kernels.host_layout import HostSeqs

    d, hq = 128, 32
    for n in lens:
        for hkv in (32, 8):
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            pos = torch.arange(n, device="cuda")
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            host = HostSeqs.of([0, n])  # cu's values: no read-back inside the timed call
            flops = _causal_flops(n, (n + 1) / 2, hq, d)
            base = dict(op="prefill", tokens=n, hq=hq, hkv=hkv, d=d, dtype="bf16")
            ms = _gpu_time_ms(
                lambda: triton_prefill.varlen_attention(q, k, v, pos, pos, cu, cu, host_q=host, host_k=host)
            )
            _emit(rows, {**base, "impl": "triton", "ms": ms, "tflops": flops / ms / 1e9}, sink)
            if hkv == hq:  # SDPA's flash backend has no GQA
                qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))

                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

                try:
                    ms = _gpu_time_ms(sdpa)
                    _emit(rows, {**base, "impl": "sdpa-flash", "ms": ms, "tflops": flops / ms / 1e9}, sink)
                except RuntimeError as e:
                    print(f"sdpa-flash unavailable: {e}")
            if flash_adapter.HAVE_FLASH:
                ms = _gpu_time_ms(
                    lambda: flash_adapter.flash_attn_varlen_func(
                        q, k, v, cu, cu, n, n, causal=True, return_attn_probs=True
                    )
                )
                _emit(rows, {**base, "impl": "flash-attn", "ms": ms, "tflops": flops / ms / 1e9}, sink)
            del q, k, v
        # striped ring step, P = 4: rank 1's queries vs rank 2's keys (strictly causal)
        P = 4
        m = n // P
        q = torch.randn(m, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(m, 8, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(m, 8, d, device="cuda", dtype=torch.bfloat16)
        qp = torch.arange(m, device="cuda") * P + 1
        kp = torch.arange(m, device="cuda") * P + 2
        cu = torch.tensor([0, m], dtype=torch.int32, device="cuda")
        host = HostSeqs.of([0, m])
        flops = _causal_flops(m, (m - 1) / 2, hq, d)
        ms = _gpu_time_ms(
            lambda: triton_prefill.varlen_attention(q, k, v, qp, kp, cu, cu, host_q=host, host_k=host)
        )
        _emit(
            rows,
            dict(
                op="ring-step P=4",
                tokens=m,
                hq=hq,
                hkv=8,
                d=d,
                dtype="bf16",
                impl="triton",
                ms=ms,
                tflops=flops / ms / 1e9,
            ),
            sink,
        )


def bench_gpu_decode(batches, contexts, sink, rows, peak_gbs):
    from esp_serve.kernels import triton_decode
    from esp_serve.kernels.host_layout import HostSeqs

    hq, hkv, d = 32, 8, 128
    for ctx in contexts:
        for b in batches:
            if b * ctx > MAX_POOL_TOKENS:
                continue
            pool_bytes = b * ctx * (2 * hkv * d * 2 + 8)  # K, V (bf16) and the slot ids
            free_bytes, _ = torch.cuda.mem_get_info()
            if pool_bytes > 0.8 * free_bytes:  # an 80 GB card cannot hold 16 x 1M tokens
                print(f"# decode batch {b} x {ctx}: skipped, pool {pool_bytes / 2**30:.0f} GiB > 80% of free")
                continue
            pool = torch.randn(b * ctx, 2, hkv, d, device="cuda", dtype=torch.bfloat16)
            ids = torch.randperm(b * ctx, device="cuda")
            cu_s = torch.arange(b + 1, device="cuda", dtype=torch.int32) * ctx
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
            # host copies of cu_q / cu_s, as a decode step passes them: without them the
            # wrapper reads both back per call, and at small shapes (batch 1 x 4K: ~16 MB,
            # a few us of HBM time) the timing would be that wait plus Python, not the kernel
            host_q, host_s = HostSeqs.from_lengths([1] * b), HostSeqs.from_lengths([ctx] * b)
            ms = _gpu_time_ms(
                lambda pool=pool, ids=ids: triton_decode.slot_attention(
                    q, cu_q, pool, ids, cu_s, host_q=host_q, host_slots=host_s
                )
            )
            gbs = pool_bytes / (ms * 1e-3) / 1e9  # every K, V and slot id read once
            _emit(
                rows,
                dict(
                    op="decode",
                    batch=b,
                    context=ctx,
                    hq=hq,
                    hkv=hkv,
                    d=d,
                    dtype="bf16",
                    impl="triton",
                    ms=ms,
                    gbs=gbs,
                    pct_of_copy=100 * gbs / peak_gbs,
                ),
                sink,
            )
            del pool, ids


def bench_cpu(sink, rows, quick, dtype):
    import torch.nn.functional as F

    from esp_serve.kernels import reference

    hq, hkv, d = 32, 8, 128
    tag = str(dtype).replace("torch.", "")
    for n in (4096,) if quick else (4096, 16384):
        q = torch.randn(n, hq, d, dtype=dtype)
        k = torch.randn(n, hkv, d, dtype=dtype)
        v = torch.randn(n, hkv, d, dtype=dtype)
        pos = torch.arange(n)
        cu = torch.tensor([0, n], dtype=torch.int32)
        flops = _causal_flops(n, (n + 1) / 2, hq, d)
        ms = _cpu_time_ms(lambda: reference.varlen_attention(q, k, v, pos, pos, cu, cu))
        _emit(
            rows,
            dict(
                op="prefill",
                tokens=n,
                hq=hq,
                hkv=hkv,
                d=d,
                dtype=tag,
                impl="torch-ref",
                ms=ms,
                gflops=flops / ms / 1e6,
            ),
            sink,
        )
        qt = q.transpose(0, 1).unsqueeze(0)
        kt, vt = (x.repeat_interleave(hq // hkv, dim=1).transpose(0, 1).unsqueeze(0) for x in (k, v))
        ms = _cpu_time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        _emit(
            rows,
            dict(
                op="prefill",
                tokens=n,
                hq=hq,
                hkv=hkv,
                d=d,
                dtype=tag,
                impl="sdpa (no lse)",
                ms=ms,
                gflops=flops / ms / 1e6,
            ),
            sink,
        )
    for ctx in (4096,) if quick else (4096, 32768):
        for b in (1, 16) if quick else (1, 16, 64):
            if b * ctx > (1 << 21):
                continue
            pool = torch.randn(b * ctx, 2, hkv, d, dtype=dtype)
            ids = torch.randperm(b * ctx)
            cu_s = torch.arange(b + 1, dtype=torch.int32) * ctx
            q = torch.randn(b, hq, d, dtype=dtype)
            cu_q = torch.arange(b + 1, dtype=torch.int32)
            ms = _cpu_time_ms(lambda: reference.slot_attention(q, cu_q, pool, ids, cu_s), reps=3)
            nbytes = b * ctx * 2 * hkv * d * pool.element_size()
            _emit(
                rows,
                dict(
                    op="decode",
                    batch=b,
                    context=ctx,
                    hq=hq,
                    hkv=hkv,
                    d=d,
                    dtype=tag,
                    impl="torch-ref",
                    ms=ms,
                    gbs=nbytes / (ms * 1e-3) / 1e9,
                ),
                sink,
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="benchmark the torch path on CPU")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", help="append JSON lines to this file")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="CPU benchmark dtype")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sink = open(args.json, "a") if args.json else None
    rows: list[dict] = []
    host = dict(
        date=str(date.today()),
        torch=torch.__version__,
        machine=platform.machine(),
        threads=torch.get_num_threads(),
    )
    if args.cpu or not torch.cuda.is_available():
        if not args.cpu:
            print("no CUDA device: running the CPU benchmark (python -m esp_serve.kernels.bench --cpu)")
        print(f"# CPU torch path, {host}")
        bench_cpu(sink, rows, args.quick, torch.float32 if args.dtype == "fp32" else torch.bfloat16)
        return 0
    import triton

    host.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    print(f"# GPU kernels, {host}")
    peak = copy_bandwidth_gbs()
    _emit(rows, dict(op="copy", impl="torch copy_", gbs=peak), sink)
    bench_gpu_prefill(GPU_PREFILL_LENS[:1] if args.quick else GPU_PREFILL_LENS, sink, rows)
    bench_gpu_decode(
        DECODE_BATCHES[:2] if args.quick else DECODE_BATCHES,
        DECODE_CONTEXTS[:2] if args.quick else DECODE_CONTEXTS,
        sink,
        rows,
        peak,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
