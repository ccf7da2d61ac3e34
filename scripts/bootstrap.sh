#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and point it at this source tree.
#
# The environment lives in a cache directory keyed on the dependency list, so a fresh
# clone (CI) reuses it instead of reinstalling torch and ray every time; `.venv` in the
# repository is a symlink to it. Extras are added to the same environment on demand.
#   EXTRAS=test      extras to install as well (`make test` passes test)
#   TORCH_SPEC=...   torch requirement (default torch==2.13.0: the CPU build on CPU-only
#                    machines that ship it locally, the CUDA build from the registry on GPU hosts)
#   ESP_VENV_CACHE   where cached environments live (default ~/.cache/esp-serve)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CACHE_DIR=${ESP_VENV_CACHE:-$HOME/.cache/esp-serve}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRAS="${EXTRAS:+$EXTRAS,}gpu"
fi
key=$( (cat pyproject.toml scripts/bootstrap.sh; echo "$TORCH_SPEC"; "$PYTHON" --version) | sha256sum | cut -c1-16)
venv="$CACHE_DIR/venv-$key"

if [ ! -f "$venv/.complete" ]; then
    echo "[bootstrap] creating $venv (first run: a few minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$CACHE_DIR"
    "$PYTHON" -m venv "$venv"
    # torch first and pinned, so the ranges of later requirements are met by this build
    "$venv/bin/pip" install -q "$TORCH_SPEC"
    "$venv/bin/pip" install -q .
    # the project itself is imported from the source tree (see the .pth below)
    "$venv/bin/pip" uninstall -q -y esp-serve
    touch "$venv/.complete"
fi
IFS=',' read -ra wanted <<< "$EXTRAS"
for extra in "${wanted[@]}"; do
    [ -z "$extra" ] && continue
    if [ ! -f "$venv/.extra-$extra" ]; then
        echo "[bootstrap] installing extra [$extra]" >&2
        # flash-attn compiles against the installed torch, hence no build isolation
        "$venv/bin/pip" install -q --no-build-isolation ".[$extra]"
        "$venv/bin/pip" uninstall -q -y esp-serve
        touch "$venv/.extra-$extra"
    fi
done
# make `import app, esp_core, kernels` resolve to this checkout inside the environment
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/esp_serve_src.pth"
ln -sfn "$venv" .venv
echo "$venv"
