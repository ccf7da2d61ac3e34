"""`esp_core.runtime.config` must import without torch: app/ validates configs with it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_module_imports_no_torch():
    code = (
        "import sys\nimport esp_core.runtime.config\n"
        "print(','.join(m for m in ('torch', 'ray', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
