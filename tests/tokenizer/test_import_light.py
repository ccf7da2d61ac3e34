"""The ingress imports the tokenizer: it must not pull in torch (or ray, triton,
transformers), including the test-directory builder other areas' tests use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["esp_core.tokenizer", "tests.support.tokenizer"])
def test_imports_without_heavy_frameworks(module):
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "print(','.join(m for m in ('torch', 'ray', 'triton', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
