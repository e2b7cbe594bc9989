"""torch.distributed set-up from the environment torchrun provides (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import DdimctlError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share(self, indices: range) -> range:
        """This process's share of a step's items: every size-th from its rank."""
        return indices[self.rank :: self.size]


# What torchrun sets for each process; TORCHELASTIC_RUN_ID tells its launch from variables a plain run
# inherited or was given by hand (which would wait for peers that never come).
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def from_env() -> World:
    """This process's place as torchrun describes it, without joining any process group."""
    env = os.environ
    try:
        world = World(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise DdimctlError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them), got {e}") from e
    missing = [k for k in TORCHRUN_VARIABLES if k not in env]
    if world.size > 1 and missing:
        raise DdimctlError(f"WORLD_SIZE={world.size} is set but this is no torchrun launch ({', '.join(missing)} "
                           f"missing); unset WORLD_SIZE, or start the command with torchrun")
    return world


def peer_lost(error: BaseException) -> bool:
    """Whether an error is this process's process group losing a peer (which stopped first)."""
    return dist.is_available() and dist.is_initialized() and (
        isinstance(error, getattr(dist, "DistBackendError", ())) or "Connection closed by peer" in str(error)
        or "Connection reset by peer" in str(error))


def init(device: torch.device) -> World:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); else one process."""
    size = from_env().size
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def local_device(device: torch.device, world: World) -> torch.device:
    """Each process of a GPU run takes the GPU of its local rank."""
    if device.type == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
