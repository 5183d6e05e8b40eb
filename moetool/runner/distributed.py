"""Data parallelism on torch.distributed, under torchrun (moetool has no launcher of its own).

`torchrun --nproc-per-node N --no-python moetool profile ...` starts N processes with RANK,
LOCAL_RANK and WORLD_SIZE set. Each takes a disjoint, contiguous share of the sequences, runs it
on cuda:LOCAL_RANK (or the CPU), and the accumulators are summed with all_reduce (nccl on GPUs,
gloo on the CPU). Rank 0 alone prints and writes. A rank that fails makes torchrun stop the
others; collectives also time out (MOETOOL_DIST_TIMEOUT seconds, default 1800) instead of waiting
forever for a rank on another machine that died.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

from moetool.errors import MoetoolError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800


class DistributedError(MoetoolError):
    """Another rank failed, or a collective timed out."""

    exit_code = 12


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer") from None
    return World(rank, size, local) if size > 1 else World()


def is_primary() -> bool:
    """Whether this process prints and writes (rank 0, or not distributed)."""
    return world_from_env().primary


def init(world: World, device) -> None:
    """Join the process group (once): nccl for CUDA devices, gloo otherwise."""
    if not world.distributed:
        return
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = float(os.environ.get("MOETOOL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    except Exception as exc:   # rendezvous failures surface as several exception types
        raise DistributedError(f"rank {world.rank}: could not join the torch.distributed group ({exc})") from None
    atexit.register(_leave)   # the group's threads stopped before interpreter shutdown, not during it
    log.info("rank %d of %d on %s (%s)", world.rank, world.size, device, backend)


def joined() -> bool:
    """Whether this process is in a torch.distributed group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _leave() -> None:
    """Destroy the process group at exit (a local operation: no peer is waited for)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:   # exiting anyway: say so, do not mask the exit status
            log.debug("destroying the process group failed: %s", exc)


def share(units: int, world: World) -> tuple[int, int]:
    """(first, count) of UNITS split into contiguous, near-equal shares, this rank's one."""
    per, extra = divmod(units, world.size)
    first = world.rank * per + min(world.rank, extra)
    return first, per + (1 if world.rank < extra else 0)


def collective(what: str, fn, *args, **kwargs):
    """Run a collective, turning a dead peer or a timeout into a one-line error."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:   # gloo and nccl report peers that died or timed out this way
        world = world_from_env()
        raise DistributedError(f"rank {world.rank}: {what} failed: another rank stopped or timed out "
                               f"({str(exc).splitlines()[0][:200]})") from None


def all_reduce(tensor, op: str = "sum"):
    """In place: the sum (or max) of TENSOR over all ranks; a no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    reduce = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    collective("all_reduce", dist.all_reduce, tensor, op=reduce)
    return tensor


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        collective("barrier", dist.barrier)


def reduce_scalar(value: float, op: str) -> float:
    """The sum (or max) of a host number over all ranks; VALUE itself in a single process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    return float(all_reduce(tensor, op)[0])
