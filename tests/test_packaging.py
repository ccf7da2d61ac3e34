"""Our import names never shadow another distribution's, installed or run from a checkout.

`transformers` imports Hugging Face's `kernels` distribution; a package of ours importable as
`kernels` (installed top-level, or found first on sys.path when Python runs from the
repository root) breaks it. So the wheel holds only the project's own top-level names, and
the generic folders (app/, kernels/) are not regular packages by those names.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_TOP_LEVEL = {"esp_core", "esp_serve"}
# folders whose .py files ship in the wheel, by import name
SHIPPED = {"app": "esp_serve/app", "kernels": "esp_serve/kernels", "esp_core": "esp_core"}


def _other_distributions_names() -> dict[str, list[str]]:
    names = importlib.metadata.packages_distributions()
    return {
        name: [d for d in dists if d != "esp-serve"]
        for name, dists in names.items()
        if any(d != "esp-serve" for d in dists)
    }


def test_wheel_holds_only_our_top_level_names_and_every_module(tmp_path):
    # built from a copy: setuptools writes build/ beside the sources it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "__pycache__", "build", "docs", "tests"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, str(src), "-w", str(tmp_path)], check=True, cwd=tmp_path, timeout=120)
    (wheel,) = tmp_path.glob("esp_serve-*.whl")
    members = zipfile.ZipFile(wheel).namelist()
    top = {m.split("/")[0] for m in members if not m.split("/")[0].endswith(".dist-info")}
    assert top == OUR_TOP_LEVEL
    for folder, prefix in SHIPPED.items():
        for source in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            assert f"{prefix}/{source.relative_to(ROOT / folder).as_posix()}" in members, source


def test_no_package_of_ours_shadows_an_installed_distribution():
    others = _other_distributions_names()
    for name in OUR_TOP_LEVEL:
        assert name not in others, f"import name {name!r} is also {others.get(name)}"
    # run from the repository root, '' on sys.path makes every regular package there importable
    # by its folder name (tests/ is pytest's and never installed, but must not collide either)
    for folder in ROOT.iterdir():
        if (folder / "__init__.py").is_file():
            assert folder.name not in others, (
                f"{folder.name}/ is a regular package named like {others[folder.name]}: "
                "drop its __init__.py and map it into esp_serve in pyproject.toml"
            )


def test_transformers_hub_kernels_imports_from_the_repository_root():
    # the failure this guards against: `from kernels import CUDAProperties` found our kernels/
    result = subprocess.run(
        [sys.executable, "-c", "import transformers.integrations.hub_kernels"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_our_modules_import_by_their_installed_names_outside_the_checkout(tmp_path):
    code = (
        "import esp_serve.app.builder, esp_serve.kernels.api, esp_core.sched.scheduler; "
        "import esp_serve.app.builder as b; print(b.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).resolve() == ROOT / "app" / "builder.py"
