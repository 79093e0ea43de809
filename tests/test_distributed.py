"""Distributed training on the CPU: 2 processes, the gloo backend, a file rendezvous.

DistributedDataParallel training of a sparsified model (SparseLinear values), of a model
pruned while training (Pruner created before or after the DDP wrap), and FSDP2
(fully_shard) of a sparsified model: both ranks must end with identical parameters and
masks, equal to single-process training on the same global batch. One spawn runs every
scenario (one start-up) and is bounded in time: a hang fails the tests instead of blocking
the run."""

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sparsekit as sk

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 4
TIMEOUT_S = 240  # the whole spawn: start-up, rendezvous, every scenario


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 32, generator=g), torch.randn(GLOBAL_BATCH, 16, generator=g))
            for _ in range(STEPS)]


def strip(name):
    return name.removeprefix("module.")


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


def train(scenario: str, rank: int, world: int) -> dict:
    """Runs `scenario` on this rank's share of each global batch (the whole batch when
    world == 1) and returns the final parameters, buffers and masks (full tensors)."""
    model = make_model()
    pruner = None
    if scenario in ("ddp_sparse", "fsdp2_sparse"):
        sk.sparsify(model)
    if scenario == "ddp_pruner_before":
        pruner = sk.prune.Pruner(model, sk.prune.linear(0.0, 0.5, steps=STEPS - 1))
    wrapped = model
    if world > 1 and scenario.startswith("ddp"):
        wrapped = nn.parallel.DistributedDataParallel(model)
    if world > 1 and scenario == "fsdp2_sparse":
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, sk.SparseLinear):
                fully_shard(layer)
        wrapped = fully_shard(model)
    if scenario == "ddp_pruner_after":  # the Pruner is given the wrapped model
        pruner = sk.prune.Pruner(wrapped, sk.prune.linear(0.0, 0.5, steps=STEPS - 1))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    share = GLOBAL_BATCH // world
    for x, y in batches():
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = ((wrapped(x) - y) ** 2).mean()  # DDP / FSDP average the ranks' gradients
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()
    out = {"masks": {strip(k): v.clone() for k, v in pruner.masks().items()} if pruner else {}}
    if pruner is not None:
        pruner.finalize()  # bakes the zeros in: the masks (buffers) are gone
        if world > 1:  # so the model is wrapped anew to go on training
            wrapped = nn.parallel.DistributedDataParallel(model)
        x, y = batches()[0]
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        ((wrapped(x) - y) ** 2).mean().backward()
        out["grad_after_finalize"] = {strip(k): full(p.grad).clone()
                                      for k, p in wrapped.named_parameters()}
    out["state"] = {strip(k): full(v).detach().clone() for k, v in wrapped.state_dict().items()
                    if isinstance(v, torch.Tensor)}  # not SparseLinear's extra state
    return out


SCENARIOS = ["ddp_sparse", "ddp_pruner_before", "ddp_pruner_after", "fsdp2_sparse"]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Runs every scenario in one process group (one start-up for all); a scenario that
    raises saves its traceback, so each test reports its own failure."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for scenario in SCENARIOS:
            try:
                result = train(scenario, rank, world)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{scenario}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """{scenario: [rank 0 result, rank 1 result]} from one spawn of WORLD processes, bounded
    by TIMEOUT_S: a hang fails the tests instead of blocking the run."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed with gloo")
    tmp = tmp_path_factory.mktemp("distributed")
    ctx = mp.spawn(_worker, args=(WORLD, str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{WORLD} processes did not finish within {TIMEOUT_S} s")
    return {s: [torch.load(tmp / f"{s}.rank{r}.pt") for r in range(WORLD)] for s in SCENARIOS}


def assert_same(got: dict, want: dict, exact: bool, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        if exact or want[k].dtype in (torch.bool, torch.uint8, torch.int64):
            assert torch.equal(got[k], want[k]), f"{what}: {k} differs"
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ranks_equal_each_other_and_single_process(scenario, distributed_results):
    ranks = distributed_results[scenario]
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"rank {rank}:\n{result.get('error')}"
    single = train(scenario, 0, 1)
    for key in single:
        assert_same(ranks[1][key], ranks[0][key], exact=True, what=f"rank 1 vs rank 0 {key}")
        assert_same(ranks[0][key], single[key], exact=False, what=f"2 ranks vs 1 process {key}")
    if scenario == "ddp_sparse":
        assert "0.values" in single["state"] and "0.weight" not in single["state"]
    if scenario == "fsdp2_sparse":
        assert "0.values" in single["state"]
    if scenario.startswith("ddp_pruner"):
        mask = single["masks"]["0"]
        assert 0.45 < 1 - mask.float().mean().item() < 0.55  # the schedule's 50% was reached
        assert (single["state"]["0.weight"][~mask] == 0).all()
        assert (single["grad_after_finalize"]["0.weight"] != 0).any()
