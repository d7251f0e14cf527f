"""Two local gloo processes: one injects an inf into its gradients, both must skip that step.

Covers the scaler API with DDP (rank 1 corrupts its gradients after DDP's all-reduce, the way a
sharded/FSDP rank sees only its own shard) and mixprec.amp's scale_loss path. A control run with
``distributed=False`` shows the all-reduce is what makes the ranks agree.
"""

from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 6
BAD = {2: 1, 3: 0}  # iteration -> the one rank that injects an inf


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _batch(rank: int, it: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * it + rank)
    return torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)


def _scaler_run(rank: int, distributed: bool) -> list[tuple[float, bool]]:
    from mixprec.amp import DynamicLossScaler

    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=100, distributed=distributed)
    trace = []
    for it in range(STEPS):
        opt.zero_grad()
        x, y = _batch(rank, it)
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if BAD.get(it) == rank:
            next(model.parameters()).grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        trace.append((scaler.get_scale(), scaler.last_step_skipped))
    return trace


def _amp_run(rank: int) -> list[tuple[float, bool]]:
    import mixprec
    from mixprec import amp

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = mixprec.DynamicLossScaler(init_scale=2.0**10, growth_interval=100)
    model, opt = mixprec.initialize(model, opt, opt_level="O0", loss_scale=scaler)
    trace = []
    for it in range(STEPS):
        opt.zero_grad()
        x, y = _batch(rank, it)
        with mixprec.scale_loss(torch.nn.functional.mse_loss(model(x), y), opt) as scaled:
            scaled.backward()
            if BAD.get(it) == rank:
                model[2].bias.grad[0] = math.inf
        opt.step()
        trace.append((amp.get_scaler(opt).get_scale(), amp.last_step_skipped(opt)))
    return trace


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {
            "scaler": _scaler_run(rank, distributed=None),
            "local": _scaler_run(rank, distributed=False),
            "amp": _amp_run(rank),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_skip_the_same_steps(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expected_skips = [it in BAD for it in range(STEPS)]
    for kind in ("scaler", "amp"):
        assert r0[kind] == r1[kind], kind
        assert [skipped for _, skipped in r0[kind]] == expected_skips, kind
        assert [s for s, _ in r0[kind]] == [1024.0, 1024.0, 512.0, 256.0, 256.0, 256.0], kind
    # control: without the all-reduce only the corrupted rank skips
    for rank, res in enumerate((r0, r1)):
        assert [s for _, s in res["local"]] == [BAD.get(it) == rank for it in range(STEPS)]
