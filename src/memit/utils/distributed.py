"""Work split across the processes of a torch.distributed group (``torchrun``), and a no-op
without one: every helper behaves as a group of one process when none is initialised.

Collectives run on the backend's device: the CPU for gloo, the process's CUDA device for
nccl; tensors are moved there and back.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from memit.errors import InputError

T = TypeVar("T")


def init_from_environment() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1):
    nccl with the process's own CUDA device (LOCAL_RANK) where CUDA is present, else gloo.
    False when there is no group to join or it is joined already."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(process_cuda_device(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def process_cuda_device(local_rank: int, device_count: int) -> int:
    """The CUDA device of the process with ``local_rank``: its own, since nccl cannot put two
    processes of one group on one device."""
    if local_rank >= device_count:
        raise InputError(
            f"torchrun --nproc-per-node: process {local_rank} of this machine has no CUDA device of its own "
            f"({device_count} visible); nccl needs one per process, so start at most {device_count}"
        )
    return local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T], heavy: Callable[[T], bool] | None = None) -> list[T]:
    """This process's share: every ``world_size()``-th item from its rank on. With ``heavy``,
    the heavy items and the rest are dealt out separately: dealt out together, heavy items that
    recur at a period the world size divides (fluency on every 10th case, 2 processes) all go to
    one process, which the others then wait for."""
    if heavy is None:
        return list(items[rank() :: world_size()])
    return shard([i for i in items if heavy(i)]) + shard([i for i in items if not heavy(i)])


def unshard(parts: list[list[T]]) -> list[T]:
    """The inverse of `shard`: the shares of all ranks interleaved back into order."""
    out: list[T] = []
    longest = max((len(p) for p in parts), default=0)
    for i in range(longest):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def rows_by_shard(items: Sequence[T], rows_of: Callable[[list[T]], torch.Tensor]) -> torch.Tensor:
    """``rows_of(items)`` (a tensor with one row per item), each process computing the rows of
    its `shard` and every process getting all of them, in order. Without a group, or with
    fewer items than processes, every process computes all rows itself."""
    if not is_distributed() or len(items) < world_size():
        return rows_of(list(items))
    part = rows_of(shard(items))
    parts = all_gather(part.cpu())
    return torch.stack(unshard([list(share) for share in parts])).to(part.device)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (in place where the device allows)."""
    if not is_distributed():
        return tensor
    device = _collective_device()
    if tensor.device == device:
        dist.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    return tensor.copy_(moved)


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable; tensors travel on the CPU), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it: for work done once and then
    shared through the filesystem, such as converting a model."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
