#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve every dependency of the project (core + `test`
# extra) against the torch release in requirements/torch.txt, for Python 3.10 and later on
# every platform, with uv's resolver. Run it after changing dependencies in pyproject.toml,
# commit the lock with them, and scripts/bootstrap.sh builds a new cached environment
# (the lock is part of its cache key).
#   scripts/lock.sh            # refresh
#   scripts/lock.sh --upgrade  # also move already-locked packages to their newest releases
set -euo pipefail
cd "$(dirname "$0")/.."

uv_dir=${UV_TOOL_DIR:-$HOME/.cache/esp-serve/uv}
if ! command -v uv >/dev/null 2>&1; then
    if [ ! -x "$uv_dir/bin/uv" ]; then
        python3 -m pip install -q --target "$uv_dir" uv
    fi
    PATH="$uv_dir/bin:$PATH"
fi
upgrade=()
[ "${1:-}" = "--upgrade" ] && upgrade=(--upgrade)
uv pip compile pyproject.toml --extra test --universal --python-version 3.10 \
    -c requirements/torch.txt --no-header -q "${upgrade[@]}" -o requirements/lock.txt
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pins"
