"""MPSERVE_DEVICE: tinygrad's device of the API and the worker, checked at start with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from tinygrad import Device
from tinygrad.helpers import DEV

from common.device import DeviceError, use_device
from tests.helpers import REPO, clean_env


@pytest.fixture
def restore_dev() -> Iterator[None]:
    """use_device sets tinygrad's DEV for the whole process: put it back for the rest of the suite."""
    value, env = DEV.value, os.environ.get("DEV")
    try:
        yield
    finally:
        DEV.value = value
        if env is None:
            os.environ.pop("DEV", None)
        else:
            os.environ["DEV"] = env


def test_unset_keeps_tinygrads_choice() -> None:
    assert use_device(None) == Device.DEFAULT


def test_a_device_that_works_is_selected(restore_dev: None) -> None:
    assert use_device("cpu") == "CPU" == Device.DEFAULT
    assert os.environ["DEV"] == "cpu"  # children (tinygrad's compile workers) choose the same


def test_cuda_without_a_gpu_is_a_clear_error(restore_dev: None) -> None:
    with pytest.raises(DeviceError, match=r"MPSERVE_DEVICE='CUDA': tinygrad cannot run on CUDA here \(no NVIDIA "
                                          r"driver or GPU visible to this process: libcuda did not load\)"):
        use_device("CUDA")


def test_an_unknown_device_names_the_known_ones(restore_dev: None) -> None:
    with pytest.raises(DeviceError, match=r"no device 'CUDAA' \(it has .*CPU, CUDA,"):
        use_device("cudaa")


@pytest.mark.parametrize(("module", "how"), [("server", "flag"), ("worker", "env")])
def test_the_processes_stop_at_start(module: str, how: str) -> None:
    """`python -m server --device CUDA` and `MPSERVE_DEVICE=CUDA python -m worker` exit 1 with the reason."""
    args, env = (["--device", "CUDA"], {}) if how == "flag" else ([], {"MPSERVE_DEVICE": "CUDA"})
    proc = subprocess.run([sys.executable, "-m", module, *args, "--redis-url", "redis://127.0.0.1:1/0"], cwd=REPO,
                          env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"mpserve {'serve' if module == 'server' else 'worker'}: MPSERVE_DEVICE='CUDA': tinygrad cannot run on " \
           "CUDA here (no NVIDIA driver" in proc.stderr, proc.stderr[-2000:]
