"""runner/device.py: which device, and whether TORCH_COMPILE can build kernels here."""

from __future__ import annotations

import logging
import sysconfig

import pytest

from runner import device as devices


@pytest.fixture
def toolchain(monkeypatch, tmp_path):
    """A compiler on PATH and Python headers in `tmp_path`; tests take one of them away."""
    (tmp_path / "Python.h").write_text("")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(devices.shutil, "which",
                        lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    real = sysconfig.get_paths
    monkeypatch.setattr(devices.sysconfig, "get_paths",
                        lambda *a, **k: {**real(*a, **k), "include": str(tmp_path)})
    return tmp_path


def test_compile_stays_on_where_the_toolchain_is_complete(toolchain):
    assert devices.missing_compile_toolchain() is None
    assert devices.resolve("cpu", compile=True) == devices.Device("cpu", compile=True)


def test_without_a_c_compiler_torch_compile_is_ignored_with_a_warning(toolchain, monkeypatch,
                                                                       caplog):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert "no C compiler" in devices.missing_compile_toolchain()
    with caplog.at_level(logging.WARNING, logger="runner.device"):
        assert devices.resolve("cpu", compile=True).compile is False
    assert "TORCH_COMPILE is ignored: no C compiler" in caplog.text
    # $CC is what Triton and Inductor use first
    monkeypatch.setenv("CC", "/opt/cc")
    assert devices.missing_compile_toolchain() is None


def test_without_python_headers_torch_compile_is_ignored(toolchain):
    (toolchain / "Python.h").unlink()
    assert devices.missing_compile_toolchain() == f"no Python headers ({toolchain}/Python.h)"
    assert devices.resolve("cpu", compile=True).compile is False


def test_the_toolchain_is_not_checked_when_compile_is_off(toolchain, monkeypatch, caplog):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="runner.device"):
        assert devices.resolve("cpu") == devices.Device("cpu")
    assert caplog.text == ""


@pytest.mark.parametrize(("version", "expected"), [
    ("2.13.0+cpu", "cpu"), ("2.1.0+cpu.cxx11.abi", "cpu"),
    ("2.13.0", "cuda"), ("2.13.0+cu130", "cuda"),
])
def test_auto_serves_on_cpu_when_torch_is_a_cpu_build(monkeypatch, caplog, version, expected):
    """A CPU wheel beside a GPU would fail every load; `auto` reads the wheel's metadata."""
    from runner import hardware

    monkeypatch.setattr(hardware, "gpu_count", lambda: 1)
    monkeypatch.setattr(hardware.metadata, "version",
                        lambda name: version if name == "torch" else "0")
    with caplog.at_level(logging.WARNING, logger="runner.device"):
        assert devices.resolve("auto").type == expected
    assert ("torch is a CPU build" in caplog.text) == (expected == "cpu")
    # an explicit DEVICE is obeyed
    assert devices.resolve("cuda").type == "cuda"


def test_auto_without_torch_metadata_trusts_nvml(monkeypatch):
    from runner import hardware

    def missing(name):
        raise hardware.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hardware, "gpu_count", lambda: 1)
    monkeypatch.setattr(hardware.metadata, "version", missing)
    assert devices.resolve("auto").type == "cuda"
    monkeypatch.setattr(hardware, "gpu_count", lambda: 0)
    assert devices.resolve("auto").type == "cpu"
