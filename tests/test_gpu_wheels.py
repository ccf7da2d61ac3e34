"""scripts/gpu_wheels.py: what an offline GPU host is sent (the download itself needs the
registry and is exercised by running the script, docs/benchmarks.md "GPU check")."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "scripts" / "gpu_wheels.py")
assert _spec is not None and _spec.loader is not None
gpu_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_wheels)


def test_pins_follow_the_hosts_python(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# header\n"
        "contourpy==1.3.3 ; python_full_version == '3.11.*'\n"
        "    # via matplotlib\n"
        "contourpy==1.4.0 ; python_full_version >= '3.12'\n"
        "colorama==0.4.6 ; sys_platform == 'win32'\n"
        "Ray[serve]==2.60.0\n"
    )
    assert gpu_wheels.locked_pins(lock, gpu_wheels.host_environment("3.12")) == {
        "contourpy": "1.4.0",
        "ray": "2.60.0",
    }
    assert gpu_wheels.locked_pins(lock, gpu_wheels.host_environment("3.11.7"))["contourpy"] == "1.3.3"


def test_only_what_the_image_lacks_is_shipped():
    pins = {
        "torch": "2.13.0",
        "nvidia-nccl-cu13": "2",
        "ray": "2.60.0",
        "numpy": "2.4",
        "mypy": "1",
        "pydantic": "2",
    }
    assert gpu_wheels.wanted(pins, {"numpy"}) == {"pydantic": "2", "ray": "2.60.0"}
    # Ray Serve's recent lower bound on aiohttp: shipped even where the image has one
    assert "aiohttp" in gpu_wheels.wanted({"aiohttp": "3.14.5"}, {"aiohttp"})


def test_the_real_lock_ships_the_server_and_not_the_cuda_stack():
    pins = gpu_wheels.locked_pins(REPO / "requirements" / "lock.txt", gpu_wheels.host_environment("3.12"))
    image = gpu_wheels.image_packages(REPO / "scripts" / "gpu_image_packages.txt")
    shipped = gpu_wheels.wanted(pins, image)
    assert {"ray", "pydantic", "fastapi", "starlette", "uvicorn", "opentelemetry-sdk", "gguf"} <= set(shipped)
    assert not {"torch", "triton", "numpy", "transformers"} & set(shipped)
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in shipped)


def test_ray_repack_drops_the_jars_and_keeps_modes(tmp_path):
    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        binary = zipfile.ZipInfo("ray/core/src/ray/raylet/raylet")
        binary.external_attr = 0o100755 << 16
        zf.writestr(binary, b"\x7fELF" + b"\0" * 4096)
        zf.writestr("ray/jars/ray_dist.jar", b"J" * 100_000)
        zf.writestr("ray/__init__.py", b"")
        zf.writestr(
            "ray-2.60.0.dist-info/RECORD",
            "ray/__init__.py,,\nray/jars/ray_dist.jar,sha256=x,100000\nray/core/src/ray/raylet/raylet,,\n",
        )
    assert gpu_wheels.repack_ray(wheel) > 0
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "ray/jars/ray_dist.jar" not in names and "ray/__init__.py" in names
        assert "ray/jars/" not in zf.read("ray-2.60.0.dist-info/RECORD").decode()
        info = zf.getinfo("ray/core/src/ray/raylet/raylet")
        assert info.compress_type == zipfile.ZIP_LZMA
        assert (info.external_attr >> 16) & 0o111, "the binary lost its execute bit"
        assert zf.read(info) == b"\x7fELF" + b"\0" * 4096
