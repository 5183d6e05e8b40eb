"""Device and dtype choice."""

from __future__ import annotations

from moetool.errors import MoetoolError, UsageError


class DeviceError(MoetoolError):
    """No such device, or out of memory on it."""

    exit_code = 10


def pick_device(requested: str | None = None, *, local_rank: int | None = None):
    """The device asked for ("auto": CUDA when present), made the current CUDA device. Under torchrun
    (LOCAL_RANK given), "auto" and "cuda" mean cuda:LOCAL_RANK."""
    import torch

    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and local_rank is not None:
        requested = f"cuda:{local_rank}"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {requested}: CUDA is not available here", hint="use --device cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)   # streams, events and pinned copies then default to it
    return device


def pick_dtype(requested: str | None, device):
    """bf16 on GPUs, fp32 on CPU unless asked (CPU bf16 matmuls are slow)."""
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in names:
        raise UsageError(f"--dtype {requested}: use one of auto, {', '.join(names)}")
    return names[requested]


def available_memory(device) -> int:
    """Bytes free on DEVICE (host: MemAvailable)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
