"""The policy packages stay pure: importing them must not pull in torch, ray or triton,
and the ingress-side tokenizer must not pull in torch either."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "triton")


def _pure_modules() -> list[str]:
    mods = []
    for pkg in ("esp_core/sched", "esp_core/sim"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] == "__main__":
                continue
            mods.append(".".join(parts))
    for extra in ("esp_core/tokenizer.py", "esp_core/tokenizer"):
        if (ROOT / extra).exists():
            mods.append("esp_core.tokenizer")
    return mods


@pytest.mark.parametrize("module", _pure_modules())
def test_module_imports_no_heavy_framework(module):
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"
