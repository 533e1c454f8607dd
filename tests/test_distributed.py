"""Several processes: each takes its slice of the global batch, and gradients are averaged over processes; FSDP
settings the loop cannot honour are refused."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from e2ediff.fsdp import check_fsdp
from e2ediff.trainer import BatchStream, Part, _all_processes, _any_process, _average_gradients


def test_rank_slices_partition_the_global_batch():
    full = BatchStream(50, 8, seed=3, rank=0, world=1)
    for step in (0, 6, 13):
        parts = [BatchStream(50, 8, seed=3, rank=r, world=2).indices(step) for r in range(2)]
        assert torch.equal(torch.cat(parts), full.indices(step))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)                     # same initial weights on every process
    x = torch.randn(8, 4)                             # the global batch; this process takes its half
    mine = x[rank * 4:(rank + 1) * 4]
    model(mine).pow(2).mean().backward()
    params = list(model.parameters())
    _average_gradients(params, world)
    if rank == 0:
        torch.save([p.grad for p in params], out)
    dist.destroy_process_group()


def test_averaged_gradients_equal_the_single_process_gradient(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    averaged = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    model(x).pow(2).mean().backward()                 # mean over 8 = mean of the two halves' means
    for got, want in zip(averaged, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _decide(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    acc = SimpleNamespace(num_processes=world, device=torch.device("cpu"))
    local = [True, rank == 0, False]                   # everywhere / on process 0 only / nowhere
    torch.save({"all": [_all_processes(acc, f) for f in local], "any": [_any_process(acc, f) for f in local]},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_step_decisions_are_the_same_on_every_process(tmp_path):
    """A non-finite loss on one process skips the step on all of them, and process 0's time limit stops all of them:
    a process that decided alone would wait forever in the next collective."""
    out = str(tmp_path / "decisions")
    mp.spawn(_decide, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got == {"all": [True, False, False], "any": [True, True, False]}, rank
    one = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    assert _all_processes(one, True) and not _all_processes(one, False) and _any_process(one, True)


def test_fsdp_settings_the_loop_cannot_honour_are_refused_by_their_config_field():
    def accelerator(version=2, checkpointing=False):
        plugin = SimpleNamespace(activation_checkpointing=checkpointing)
        return SimpleNamespace(is_fsdp2=version == 2, state=SimpleNamespace(fsdp_plugin=plugin))

    whole_step = [Part("net", torch.nn.Linear(2, 2), None, ddp=True)]
    check_fsdp(accelerator(), whole_step)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_fsdp(accelerator(version=1), whole_step)
    with pytest.raises(ValueError, match="fsdp_activation_checkpointing"):
        check_fsdp(accelerator(checkpointing=True), whole_step)
    with pytest.raises(ValueError, match="distributed_type: FSDP"):
        check_fsdp(accelerator(), [Part("net", torch.nn.Linear(2, 2), None)])
    with pytest.raises(ValueError, match="loss.gan"):
        check_fsdp(accelerator(), [*whole_step, Part("disc", torch.nn.Linear(2, 2), None)])
