"""Device checks of ``FastGenerator``, run before anything is moved or allocated:
the device exists here, and a request's buffers fit in its free memory."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["checked_device", "available_bytes", "check_fits", "native_bf16_matmul",
           "TOKENIZER_DTYPES", "tokenizer_dtype"]

_CGROUP = Path("/sys/fs/cgroup")


def checked_device(device) -> torch.device:
    """``torch.device(device)``, or a ValueError naming ``device`` when it is malformed or
    not available here (moving a model there would raise deep inside torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)   # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"device: {str(dev)!r} cannot run generation (torch has no "
                         f"torch.{dev.type}.is_available()); use 'cpu' or 'cuda'")
    if not backend.is_available():
        raise ValueError(f"device: {str(dev)!r} is not available on this machine "
                         f"(torch.{dev.type}.is_available() is False); use 'cpu'")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if dev.index is not None and count is not None and dev.index >= count:
        raise ValueError(f"device: {str(dev)!r} does not exist; this machine has {count} "
                         f"{dev.type} device(s)")
    return dev


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit (None: no limit)."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        used = int((_CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def _host_available() -> int | None:
    """Host memory a new allocation can get without swapping: MemAvailable (free + reclaimable
    caches), else the free pages; the cgroup limit when lower. None where unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    cgroup = _cgroup_free()
    return avail if cgroup is None else min(avail, cgroup)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new tensor on ``device`` can use, in bytes (None: unknown, not checked).

    CUDA: the driver's free memory plus what torch's caching allocator holds unused.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _host_available()
    return None


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """Raise a ValueError starting with ``what`` (the request, named by its argument) when
    ``needed`` bytes exceed the memory available on ``device``."""
    avail = available_bytes(device)
    if avail is not None and needed > avail:
        raise ValueError(f"{what} needs at least {needed:,} bytes ({needed / 2**30:.3g} GiB), "
                         f"but {device} has {avail:,} bytes ({avail / 2**30:.3g} GiB) available; "
                         f"use a smaller batch")


# CPU flags (Linux names) of hardware bfloat16 dot products that oneDNN's convolutions use
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# --tokenizer-dtype values
TOKENIZER_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16_matmul() -> tuple[bool, str]:
    """(True, why) where this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16);
    elsewhere torch emulates bf16 matmuls in float32, several times slower than float32."""
    from nbp_kernels.cpu_build import cpu_flags

    found = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if found:
        return True, f"the CPU has {found[0]}"
    return False, f"the CPU has none of {list(NATIVE_BF16_FLAGS)}"


def tokenizer_dtype(choice: str, device) -> tuple[torch.dtype, str]:
    """The video tokenizer's dtype for a ``--tokenizer-dtype`` value, and why.

    "auto": bfloat16 on a CPU with native bf16 matmul (the published-size tokenizer ran
    1.9-2.0x faster there, at the same reconstruction PSNR; README, "Tokenizer on the
    CPU"), float32 elsewhere (CUDA included: the tokenizer's convolutions were
    validated in float32). Raises ValueError naming --tokenizer-dtype otherwise.
    """
    if choice not in TOKENIZER_DTYPES:
        raise ValueError(f"--tokenizer-dtype: expected one of {list(TOKENIZER_DTYPES)}, "
                         f"got {choice!r}")
    if choice != "auto":
        return getattr(torch, choice), "--tokenizer-dtype"
    if torch.device(device).type != "cpu":
        return torch.float32, "auto: float32 off the CPU"
    native, why = native_bf16_matmul()
    return (torch.bfloat16 if native else torch.float32), f"auto: {why}"
