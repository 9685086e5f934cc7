"""Data-parallel training across processes (`torchrun`), with negatives from the global batch.

Every rank takes a contiguous slice of the global batch. Embeddings are gathered from all ranks
*with* their gradients, as open_clip's ``gather_with_grad`` does, so each rank computes the loss
of the whole global batch, exactly as one process would; gradients are then averaged across
ranks. Rank 0 alone writes checkpoints. The backend is NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from focalsearch.train.data import TrainingBatch


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Ranks:
    """Join the process group that torchrun describes in the environment (a single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ranks


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: TrainingBatch, ranks: Ranks) -> TrainingBatch:
    """This rank's contiguous slice of a global batch (slices in rank order make the global batch)."""
    if not ranks.distributed:
        return batch
    size = len(batch.images)
    lo, hi = ranks.rank * size // ranks.world, (ranks.rank + 1) * size // ranks.world
    return replace(
        batch, images=batch.images[lo:hi], instructions=batch.instructions[lo:hi], targets=batch.targets[lo:hi],
        captions=None if batch.captions is None else batch.captions[lo:hi],
    )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered rows into the owner's."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, world: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


def gather_with_grad(local: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Concatenate every rank's rows (equally many on each) in rank order; gradients flow back to each rank's own rows."""
    if not ranks.distributed:
        return local
    return _GatherWithGrad.apply(local, ranks.world, ranks.rank)


def gather_strings(local: list[str], ranks: Ranks) -> list[str]:
    """Concatenate every rank's list in rank order."""
    if not ranks.distributed:
        return local
    gathered: list[list[str] | None] = [None] * ranks.world
    dist.all_gather_object(gathered, local)
    return [text for part in gathered for text in part]


def average_gradients(parameters: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Average the gradients of ``parameters`` across ranks (a parameter without one counts as zero)."""
    if not ranks.distributed:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad /= ranks.world


def broadcast_parameters(module: torch.nn.Module, ranks: Ranks) -> None:
    """Start every rank from rank 0's weights."""
    if not ranks.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
