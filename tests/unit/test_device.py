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
