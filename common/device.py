"""The tinygrad device of a process: ``MPSERVE_DEVICE`` (or ``--device``) of the API and of the worker.

The value is in tinygrad's own ``DEV`` syntax: ``CUDA`` (NVIDIA, through the driver and NVRTC), ``CUDA:PTX``
(the same GPU, kernels from tinygrad's PTX renderer), ``NV`` (NVIDIA without the CUDA runtime), ``AMD``,
``METAL``, ``CPU``... Unset, tinygrad chooses: its ``DEV`` variable if set, else the first device that opens.
`use_device` sets it as this process's default (and its children's: ``DEV`` in the environment), then runs
one small kernel there and reads it back, so a device asked for that is not usable stops the process at
start with a clear `DeviceError` instead of failing on the first model load.
"""

from __future__ import annotations

import os


class DeviceError(RuntimeError):
    """The device asked for cannot run tinygrad kernels in this process."""


def select_device(name: str | None) -> str:
    """Make ``name`` tinygrad's default device (unset: leave tinygrad's choice); the device it resolves to."""
    from tinygrad import Device
    from tinygrad.helpers import DEV

    if name:
        base = name.split("+")[-1].split(":")[0].upper()
        if base not in Device._devices:
            raise DeviceError(f"MPSERVE_DEVICE={name!r}: tinygrad has no device {base!r} "
                              f"(it has {', '.join(sorted(Device._devices))})")
        DEV.value = name
        os.environ["DEV"] = name  # spawned children (tinygrad's compile workers) choose the same
    try:
        return Device.DEFAULT
    except Exception as exc:  # tinygrad's own choice: no device opened at all
        raise DeviceError(f"tinygrad found no usable device: {exc}") from exc


def check_device(device: str, asked: str | None = None) -> None:
    """Open ``device``, compile and run a kernel there and read it back; a `DeviceError` saying why if not."""
    import numpy as np
    from tinygrad import Tensor

    try:
        out = (Tensor(np.array([1.0, 2.0], np.float32), device=device) * 2 + 1).numpy()
    except Exception as exc:
        hint = (" (no NVIDIA driver or GPU visible to this process: libcuda did not load)"
                if device.split(":")[0] in ("CUDA", "NV") else "")
        first = (str(exc).strip().splitlines() or [""])[0]
        raise DeviceError(f"MPSERVE_DEVICE={asked or device!r}: tinygrad cannot run on {device} here{hint} "
                          f"({type(exc).__name__}: {first}). Unset MPSERVE_DEVICE for tinygrad's default "
                          "device, or see the README's GPU section.") from exc
    if out.tolist() != [3.0, 5.0]:
        raise DeviceError(f"MPSERVE_DEVICE={asked or device!r}: a test kernel on {device} returned {out.tolist()}, "
                          "not [3.0, 5.0]")


def use_device(name: str | None) -> str:
    """`select_device`, then `check_device` when a device was asked for: the device this process runs on.

    Unset, tinygrad's own choice stands unchecked (it only picks a device that opens), so starting a process
    costs no compile.
    """
    device = select_device(name)
    if name:
        check_device(device, name)
    return device
