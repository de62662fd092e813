"""Train a gpart adapter with DDP or FSDP2 on CPU (gloo) or GPUs (nccl), launched by torchrun.

    torchrun --nproc_per_node 2 examples/distributed/train.py --engine ddp --out theta.safetensors
    torchrun --nproc_per_node 2 examples/distributed/train.py --engine fsdp2 --checkpoint non-reentrant
    torchrun --nproc_per_node 1 examples/distributed/train.py --engine none   # one process, same batch

The order that works: build the model, ``gpart.apply``, then wrap (``DistributedDataParallel``) or
shard (``fully_shard`` per block, then the root, so that ``theta``, which every block uses, lands
in the root's group), then build the optimizer from the wrapped/sharded parameters. Every rank
sees its slice of the same seeded global batch, so N processes train exactly like one process on
the whole batch (up to float summation order). Gradient checkpointing must be non-reentrant
under DDP: theta is used by every checkpointed block, and reentrant checkpointing makes DDP see
theta's gradient arrive once per block ("mark a variable ready only once").
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import gpart


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    """A small residual MLP stack; ``checkpoint`` selects activation checkpointing per block."""

    def __init__(self, width: int = 32, depth: int = 4, classes: int = 5, checkpoint: str = "none") -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)
        self.checkpoint = checkpoint

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            if self.checkpoint == "none":
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpoint == "reentrant")
        return self.head(x)


def batches(steps: int, global_batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 5, generator=g)
    for _ in range(steps):
        x = torch.randn(global_batch, 16, generator=g)
        yield x, (x @ teacher).argmax(-1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["none", "ddp", "fsdp2"], default="ddp")
    p.add_argument("--checkpoint", choices=["none", "reentrant", "non-reentrant"], default="none")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--d", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument(
        "--input-grad",
        action="store_true",
        help="make the blocks' inputs require grad (what transformers' enable_input_require_grads does)",
    )
    p.add_argument(
        "--static-graph",
        action="store_true",
        help="DistributedDataParallel(static_graph=True), which supports reentrant checkpointing",
    )
    p.add_argument("--out", default=None, help="save the adapter here (rank 0)")
    args = p.parse_args(argv)

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    torch.manual_seed(0)  # the same base model on every rank
    model = Net(checkpoint=args.checkpoint).to(device)
    gpart.apply(model, d=args.d, seed=1, targets=["up", "down"], trainable=["head"], dropout=0.1)
    if args.input_grad:
        model.embed.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))

    if args.engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model, static_graph=args.static_graph)
    elif args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)  # theta (model.gpart.theta) joins the root's group
    else:
        wrapped = model
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=args.lr)

    if world > 1 and args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must divide by {world} processes")
    share = args.global_batch // world
    for x, y in batches(args.steps, args.global_batch):
        x, y = (
            x[rank * share : (rank + 1) * share].to(device),
            y[rank * share : (rank + 1) * share].to(device),
        )
        loss = nn.functional.cross_entropy(wrapped(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.out:
        save = functools.partial(gpart.save, model, args.out)
        if args.engine == "fsdp2" or rank == 0:  # under FSDP2 save gathers theta: every rank calls it
            save()
    if rank == 0:
        print(f"done: {args.engine}, {world} process(es), loss {loss.item():.4f}")
    dist.barrier()  # leave together: a rank that exits while another is still saving can hang gloo's teardown
    dist.destroy_process_group()
    # Everything is written and the group is gone. Exiting normally runs C++ static destructors,
    # and one of torch's background threads is sometimes still joinable then: the process aborts
    # ("terminate called without an active exception", exit code -6) after its work is done, as
    # in pytorch/pytorch#190489; #179291 traces it to Gloo worker threads outliving interpreter
    # finalization (its fix, an atexit destroy, was abandoned, and destroying the group first, as
    # here, is not enough). os._exit skips those destructors; files are closed, streams flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
