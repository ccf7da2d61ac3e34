"""Compile every Triton kernel for NVIDIA GPUs *without* a GPU, and report resources.

    python -m esp_serve.kernels.compile_check [--arch 90 80] [--all-configs]

Triton compiles ahead of time for a named target (TTIR -> TTGIR -> LLVM -> PTX -> cubin
with its bundled ptxas), so type errors, tl.dot shape errors and register spills of the
GPU build show up on a CPU-only machine, where the interpreter (TRITON_INTERPRET=1)
would not see them. Arguments carry the same 16-divisibility hints a real launch gives
aligned pointers and strides. Output: one line per (kernel, arch, config) with
registers and spill bytes (cuobjdump -res-usage).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from esp_serve.kernels import triton_decode, triton_merge, triton_prefill

_PTR = "*bf16"


def _prefill_variants(head_dim=128, causal=True, accumulate=False):
    sig = {
        "Q": _PTR,
        "K": _PTR,
        "V": _PTR,
        "QPOS": "*i64",
        "KPOS": "*i64",
        "CU_Q": "*i32",
        "CU_K": "*i32",
        "FULL_END": "*i32",
        "END": "*i32",
        "O": _PTR,
        "LSE": "*fp32",
        "qk_scale": "fp32",
        "max_chunks": "i32",
        "seq_bucket": "i32",
    }
    sig.update(
        {
            n: "i32"
            for n in (
                "stride_qt",
                "stride_qh",
                "stride_kt",
                "stride_kh",
                "stride_vt",
                "stride_vh",
                "stride_ot",
                "stride_oh",
                "stride_lt",
                "stride_lh",
            )
        }
    )
    const = dict(
        GROUP=4,
        HEAD_DIM=head_dim,
        IS_CAUSAL=causal,
        ACCUMULATE=accumulate,
        DOT_PREC="tf32",
        CHUNK=triton_prefill.BOUND_CHUNK,
    )
    return triton_prefill._prefill_kernel, sig, const


def _bounds_variant():
    sig = {
        "QPOS": "*i64",
        "KPOS": "*i64",
        "CU_Q": "*i32",
        "CU_K": "*i32",
        "FULL_END": "*i32",
        "END": "*i32",
        "max_chunks": "i32",
    }
    return triton_prefill._causal_bounds_kernel, sig, dict(CHUNK=triton_prefill.BOUND_CHUNK, BLOCK=1024)


def _slot_variant(head_dim=128, block_m=16, group=4):
    sig = {
        "Q": _PTR,
        "KV": _PTR,
        "SLOTS": "*i64",
        "CU_Q": "*i32",
        "CU_S": "*i32",
        "O": _PTR,
        "LSE": "*fp32",
        "qk_scale": "fp32",
        "n_kv_heads": "i32",
        "split_size": "i32",
        "split_bucket": "i32",
    }
    sig.update(
        {
            n: "i32"
            for n in (
                "stride_qt",
                "stride_qh",
                "stride_ks",
                "stride_kk",
                "stride_kh",
                "stride_os",
                "stride_ot",
                "stride_oh",
                "stride_ls",
                "stride_lt",
                "stride_lh",
            )
        }
    )
    return (
        triton_decode._slot_kernel,
        sig,
        dict(GROUP=group, HEAD_DIM=head_dim, DOT_PREC="tf32", BLOCK_M=block_m),
    )


def _merge_variant(head_dim=128):
    sig = {
        "O_IN": "*fp32",
        "LSE_IN": "*fp32",
        "O_OUT": _PTR,
        "LSE_OUT": "*fp32",
        "n_rows": "i32",
        "n_parts": "i32",
        "stride_op": "i32",
        "stride_lp": "i32",
    }
    return triton_merge._merge_kernel, sig, dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=32)


def _configs(kernel):
    """(meta-parameters, num_warps, num_stages) of an autotuned kernel, or one default."""
    if hasattr(kernel, "configs"):
        return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in kernel.configs]
    return [({}, 4, 3)]


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(cuobjdump not bundled)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    lines = [ln.strip() for ln in out.splitlines() if "REG:" in ln]
    if not lines:
        return "(no resource line)"
    fields = dict(x.split(":", 1) for x in lines[0].split() if ":" in x)
    return f"regs={fields.get('REG')} spill_stack={fields.get('STACK')}"


def compile_one(
    kernel, sig: dict, const: dict, meta: dict, num_warps: int, num_stages: int, arch: int
) -> tuple[object, str]:
    """Compile one specialisation for sm_<arch>; returns (compiled kernel, resource line)."""
    fn = kernel
    while not isinstance(fn, JITFunction):  # unwrap @autotune / heuristics
        fn = fn.fn
    constexprs = {**const, **meta}
    signature = {**sig, **{k: "constexpr" for k in constexprs}}
    aligned = [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    return compiled, _resources(compiled.asm["cubin"])


def variants(all_configs: bool):
    """(name, kernel, sig, const, configs) to compile: every kernel, head_dims 64/128 (and
    32, the built-in model's), causal and not, accumulate, decode row blocks."""
    out = []
    for d in (32, 64, 128):
        for causal, acc in ((True, False), (False, False), (True, True)):
            if d != 128 and (not causal or acc):
                continue
            k, s, c = _prefill_variants(d, causal, acc)
            out.append((f"prefill d={d} causal={causal} acc={acc}", k, s, c))
        for bm in (16, 64):
            k, s, c = _slot_variant(d, bm)
            out.append((f"slot d={d} block_m={bm}", k, s, c))
        k, s, c = _merge_variant(d)
        out.append((f"merge d={d}", k, s, c))
    k, s, c = _bounds_variant()
    out.append(("causal_bounds", k, s, c))
    result = []
    for name, k, s, c in out:
        cfgs = _configs(k)
        result.append((name, k, s, c, cfgs if all_configs else cfgs[:1]))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not the first")
    args = ap.parse_args(argv)
    failures = 0
    for arch in args.arch:
        for name, kernel, sig, const, cfgs in variants(args.all_configs):
            for meta, warps, stages in cfgs:
                try:
                    _, res = compile_one(kernel, sig, const, meta, warps, stages, arch)
                except Exception as e:  # report and go on: one line per failure
                    failures += 1
                    res = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"sm_{arch} {name:38s} {meta} w={warps} s={stages}: {res}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
