"""The policy packages stay pure: importing them must not pull in torch, ray or triton,
and the ingress-side tokenizer must not pull in torch either.

One fresh interpreter imports every module in turn and, after each import, notes any
heavy framework that appeared: the module that brought it in is named in the failure."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "triton")

_PROBE = """
import importlib, json, sys
heavy, found = {heavy!r}, {{}}
for module in {modules!r}:
    importlib.import_module(module)
    new = [m for m in heavy if m in sys.modules and not any(m in v for v in found.values())]
    if new:
        found[module] = new
print(json.dumps(found))
"""


def _pure_modules() -> list[str]:
    mods = []
    for pkg in ("esp_core/sched", "esp_core/sim"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] == "__main__":
                continue
            mods.append(".".join(parts))
    if (ROOT / "esp_core/tokenizer").exists():
        mods.append("esp_core.tokenizer")
    return mods


def test_policy_modules_import_no_heavy_framework():
    modules = _pure_modules()
    assert "esp_core.sched.scheduler" in modules and "esp_core.sim.simulator" in modules
    code = _PROBE.format(heavy=HEAVY, modules=modules)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}, f"heavy frameworks imported by (module: frameworks) {out.stdout}"
