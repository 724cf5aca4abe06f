"""Data-parallel fit() in a process group: 2 gloo ranks on loopback, spawned from the test, bounded in time.

Each spawned group runs several scenarios (starting processes dominates the cost) and saves what each rank
saw; the checks run here, in the test process."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import traceback
import warnings
from datetime import timedelta

import hotloop
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hotloop import distributed, op_capture
from hotloop._native import _C
from hotloop._shared import CaptureError
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

WORLD = 2
N, FEATURES, BATCH, EPOCHS, SEED = 37, 5, 4, 3, 3

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)


# --- sharding: the C++ dataset against DistributedSampler, no processes needed ---------------------------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shards_equal_distributed_sampler_over_three_epochs(world, drop_last, shuffle):
    n, batch = 23, 4
    data = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    for rank in range(world):
        sampler = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=SEED, drop_last=drop_last
        )
        dataset = _C.Dataset([data], batch, shuffle, drop_last, None, True)
        dataset.set_shard(world, rank, SEED, drop_last)
        assert dataset.shard_samples == len(sampler)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            expected = list(sampler)
            batches = len(expected) // batch if drop_last else math.ceil(len(expected) / batch)
            assert dataset.batches_per_epoch == batches
            got = [i for _ in range(batches) for i in dataset.next_indices().tolist()]
            assert got == expected[: len(got)]
            assert dataset.epochs_completed == epoch + 1


# --- spawned ranks ----------------------------------------------------------------------------------------


def _data(rank_poison: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, generator=generator)
    y = torch.randn(N, 1, generator=generator)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


def _eager_ddp(data, epochs: int, drop_last: bool) -> tuple[nn.Module, list[float]]:
    """The loop a DDP user writes: DistributedSampler + DataLoader, forward, backward, step."""
    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = TensorDataset(*data)
    sampler = DistributedSampler(dataset, shuffle=True, seed=SEED, drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=drop_last)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return model.module, losses


def _hotloop_ddp(data, epochs: int, drop_last: bool, **options):
    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stream = hotloop.fit(
        data, model, opt, F.mse_loss, batch_size=BATCH, seed=SEED, drop_last=drop_last, **options
    )
    events = [next(stream) for _ in range(epochs)]
    return model, opt, stream, events


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _scenario_parity(rank: int) -> dict:
    out = {}
    for drop_last in (False, True):
        data = _data()
        model, _, stream, events = _hotloop_ddp(data, EPOCHS, drop_last)
        stream.close()
        reference, _ = _eager_ddp(data, EPOCHS, drop_last)
        out[drop_last] = {
            "hotloop": _weights(model.module),
            "eager": _weights(reference),
            "events": [
                {k: e[k] for k in ("engine", "updates", "epoch", "train_loss", "step")} for e in events
            ],
        }
    return out


def _scenario_resume(rank: int, tmp: str) -> dict:
    data = _data()
    model, opt, stream, _ = _hotloop_ddp(data, 1, False, every=3)
    state = stream.state_dict()
    stream.close()
    torch.save(state, os.path.join(tmp, f"state{rank}.pt"))
    # a new model and optimizer, as after a restart, resumed from the saved state
    resumed = DDP(_model())
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    # rank 0's state on every rank, as DDP users save it: the shard's position follows from seed, epoch, rank
    dist.barrier()
    state = torch.load(os.path.join(tmp, "state0.pt"), weights_only=False)
    stream = hotloop.fit(data, resumed, opt2, F.mse_loss, batch_size=BATCH, seed=SEED, every=3, resume=state)
    after = [next(stream)["updates"] for _ in range(4)]
    stream.close()
    straight, _, stream, _ = _hotloop_ddp(data, 5, False, every=3)
    stream.close()
    return {"resumed": _weights(resumed.module), "straight": _weights(straight.module), "updates": after}


def _scenario_python_engine(rank: int) -> dict:
    data = _data()
    model, _, stream, events = _hotloop_ddp(data, 2, False, engine="python")
    stream.close()
    reference, _ = _eager_ddp(data, 2, False)
    return {
        "hotloop": _weights(model.module),
        "eager": _weights(reference),
        "engines": [e["engine"] for e in events],
        "losses": [e["train_loss"] for e in events],
        "nonfinite": _scenario_nonfinite(rank, engine="python"),
    }


def _scenario_nonfinite(rank: int, **options) -> dict:
    x, y = _data()
    x = x.clone()
    x[N // 2] = float("nan")  # on one rank's shard only, in some epoch
    model, opt, stream, events = None, None, None, []
    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    stream = hotloop.fit((x, y), model, opt, F.mse_loss, batch_size=BATCH, seed=SEED, **options)
    try:
        for _ in range(3):
            events.append(next(stream))
        error = None
    except hotloop.NonFiniteLossError as exc:
        error = str(exc)
    return {"error": error, "weights": _weights(model.module), "events": len(events)}


def _scenario_local_sgd(rank: int, period: int = 3) -> dict:
    data = _data()
    model, _, stream, events = _hotloop_ddp(data, 2, False, sync_every=period)
    stream.close()
    # the reference: each rank steps alone on its DistributedSampler batches, parameters averaged every
    # `period` steps
    reference = _model()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    dataset = TensorDataset(*data)
    sampler = DistributedSampler(dataset, shuffle=True, seed=SEED)
    steps = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in DataLoader(dataset, batch_size=BATCH, sampler=sampler):
            opt.zero_grad()
            F.mse_loss(reference(x), y).backward()
            opt.step()
            steps += 1
            if steps % period == 0:
                with torch.no_grad():
                    for p in reference.parameters():
                        p.div_(WORLD)
                        dist.all_reduce(p)
    return {
        "hotloop": _weights(model.module),
        "reference": _weights(reference),
        "engines": [e["engine"] for e in events],
        "losses": [e["train_loss"] for e in events],
    }


def _scenario_interrupt(rank: int) -> dict:
    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stream = hotloop.fit(_data(), model, opt, F.mse_loss, batch_size=BATCH, seed=SEED, every=300)
    next(stream)
    if rank == 1:  # Ctrl-C on one rank only, in the middle of a window
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        next(stream)
        next(stream)
        return {"interrupted": False}
    except KeyboardInterrupt:
        return {"interrupted": True, "updates": stream.state_dict()["updates"]}


def _scenario_cuda(rank: int) -> dict:
    device = torch.device("cuda", rank)
    data = tuple(t.to(device) for t in _data())
    model = DDP(_model().to(device), device_ids=[rank])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    stream = hotloop.fit(data, model, opt, F.mse_loss, batch_size=BATCH, seed=SEED)
    events = [next(stream) for _ in range(EPOCHS)]
    stream.close()
    reference = DDP(_model().to(device), device_ids=[rank])
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    sampler = DistributedSampler(TensorDataset(*data), shuffle=True, seed=SEED)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        for start in range(0, len(order), BATCH):
            index = order[start : start + BATCH]
            ref_opt.zero_grad()
            F.mse_loss(reference(data[0][index]), data[1][index]).backward()
            ref_opt.step()
    return {
        "hotloop": {k: v.cpu() for k, v in _weights(model.module).items()},
        "eager": {k: v.cpu() for k, v in _weights(reference.module).items()},
        "engines": [e["engine"] for e in events],
    }


def _scenario_missing_sync_is_caught(rank: int) -> dict:
    """A graph without the all-reduce must fail the capture check: the check's batch differs per rank."""

    model = DDP(_model())
    setup = distributed.setup(model, seed=SEED)
    batches = distributed.example_batches(setup, _data(), BATCH, False)
    unsynced = distributed.synced
    distributed.synced = lambda setup, joint, positions: joint
    try:
        op_capture.capture_step(model.module, F.mse_loss, batches, last_label=True, data_parallel=setup)
        return {"caught": None}
    except CaptureError as exc:
        return {"caught": str(exc)}
    finally:
        distributed.synced = unsynced


def _worker(rank: int, store_path: str, tmp: str, scenario: str) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    try:
        if scenario == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if scenario == "cuda" else "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=30),
        )
        if scenario == "train":
            result["parity"] = _scenario_parity(rank)
            result["nonfinite"] = _scenario_nonfinite(rank)
            result["resume"] = _scenario_resume(rank, tmp)
            result["local_sgd"] = _scenario_local_sgd(rank)
            result["interrupt"] = _scenario_interrupt(rank)
            result["python"] = _scenario_python_engine(rank)
            result["missing_sync"] = _scenario_missing_sync_is_caught(rank)
        elif scenario == "cuda":
            result["cuda"] = _scenario_cuda(rank)
        elif scenario == "raise":
            model = DDP(_model())
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            stream = hotloop.fit(_data(), model, opt, F.mse_loss, batch_size=BATCH, seed=SEED, every=2)
            next(stream)
            if rank == 1:
                raise ValueError("rank 1 fails on purpose")
            started = time.perf_counter()
            try:
                for _ in range(1000):
                    next(stream)
            except RuntimeError as exc:
                result["error"] = str(exc)
                result["seconds"] = time.perf_counter() - started
    except Exception:
        result["raised"] = traceback.format_exc()
    if scenario == "raise" and rank == 1:
        torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
        os._exit(0)  # leave without a goodbye, as a crashed rank does
    if "raised" not in result and scenario != "raise":
        dist.barrier()  # no collective is pending past here
    torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
    # Leave without tearing the process group down: gloo's teardown right after collectives has aborted a
    # rank ("terminate called without an active exception") once in CI, after the scenarios had finished.
    os._exit(0)


def _spawn(tmp_path, scenario: str, timeout: float = 60.0) -> list[dict]:
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path), scenario),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks of scenario {scenario!r} did not finish within {timeout} s (a hang)")
    except mp.ProcessExitedException as exc:
        written = [rank for rank in range(WORLD) if (tmp_path / f"result{rank}.pt").exists()]
        pytest.fail(f"scenario {scenario!r}: {exc} (ranks that wrote their results: {written})")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"result{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    results = _spawn(tmp_path_factory.mktemp("ddp"), "train")
    for rank, result in enumerate(results):
        assert "raised" not in result, f"rank {rank}:\n{result['raised']}"
    return results


def _params(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if "running" not in k and "num_batches" not in k}


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("drop_last", [False, True])
def test_native_ddp_equals_a_ddp_eager_loop_on_every_rank(trained, drop_last):
    per_rank = N // WORLD if drop_last else math.ceil(N / WORLD)
    steps = per_rank // BATCH if drop_last else math.ceil(per_rank / BATCH)
    for result in trained:
        run = result["parity"][drop_last]
        _assert_close(run["hotloop"], run["eager"], atol=1e-6)
        assert [e["engine"] for e in run["events"]] == ["native"] * EPOCHS
        assert [e["updates"] for e in run["events"]] == [steps * (i + 1) for i in range(EPOCHS)]
    # identical parameters and identical events on every rank (buffers hold each rank's last batch
    # statistics, as under DDP: they are broadcast at the start of the next step)
    first = trained[0]["parity"][drop_last]
    for result in trained[1:]:
        _assert_close(_params(result["parity"][drop_last]["hotloop"]), _params(first["hotloop"]), atol=0)
        assert result["parity"][drop_last]["events"] == first["events"]


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(trained):
    errors = [r["nonfinite"]["error"] for r in trained]
    assert errors[0] is not None and "non-finite loss" in errors[0]
    assert errors[0] == errors[1]
    _assert_close(
        _params(trained[0]["nonfinite"]["weights"]), _params(trained[1]["nonfinite"]["weights"]), atol=0
    )


def test_the_python_engine_runs_ddp_eagerly_on_the_same_shards_with_collective_decisions(trained):
    for result in trained:
        run = result["python"]
        assert run["engines"] == ["python", "python"]
        _assert_close(run["hotloop"], run["eager"], atol=1e-6)
    assert trained[0]["python"]["losses"] == trained[1]["python"]["losses"]
    errors = [r["python"]["nonfinite"]["error"] for r in trained]
    assert errors[0] is not None and errors[0] == errors[1]


def test_the_capture_check_catches_a_graph_without_the_all_reduce(trained):
    for result in trained:
        caught = result["missing_sync"]["caught"]
        assert caught is not None and "differs between the captured graph and an eager step" in caught


def test_resume_across_a_restart_equals_an_uninterrupted_run(trained):
    for result in trained:
        assert result["resume"]["updates"] == [6, 9, 12, 15]
        _assert_close(result["resume"]["resumed"], result["resume"]["straight"], atol=0)


def test_sync_every_is_local_sgd_with_periodic_parameter_averaging(trained):
    for result in trained:
        run = result["local_sgd"]
        assert run["engines"] == ["native", "native"]
        _assert_close(run["hotloop"], run["reference"], atol=1e-6)
    assert trained[0]["local_sgd"]["losses"] == trained[1]["local_sgd"]["losses"]


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(trained):
    outcomes = [r["interrupt"] for r in trained]
    assert all(o["interrupted"] for o in outcomes), outcomes
    assert outcomes[0]["updates"] == outcomes[1]["updates"]


def test_a_rank_that_raises_ends_the_others_with_the_reason(tmp_path):
    results = _spawn(tmp_path, "raise", timeout=45.0)
    assert "rank 1 fails on purpose" in results[1]["raised"]
    assert "raised" not in results[0], results[0].get("raised")
    assert "another rank stopped, failed or left" in results[0]["error"]
    assert results[0]["seconds"] < 30


def _hook_on_wrapper() -> DDP:
    model = DDP(_model())
    model.register_forward_hook(lambda module, args, out: None)
    return model


def _comm_hook() -> DDP:
    model = DDP(_model())
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    return model


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: DDP(_model(), find_unused_parameters=True), "find_unused_parameters=True"),
        (lambda: DDP(_model(), static_graph=True), "static_graph=True"),
        (_comm_hook, "comm hook"),
        (_hook_on_wrapper, "wrapper itself has module hooks"),
    ],
)
def test_ddp_options_the_native_step_cannot_reproduce_are_refused_by_name(tmp_path, make, reason):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with pytest.warns(hotloop.SlowPathWarning, match=reason):
            event = next(hotloop.fit(_data(), model, opt, F.mse_loss, batch_size=BATCH, drop_last=True))
        assert event["engine"] == "python"
    finally:
        dist.destroy_process_group()


def test_no_sync_is_refused_by_name(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DDP(_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with model.no_sync(), pytest.warns(hotloop.SlowPathWarning, match="no_sync"):
            event = next(hotloop.fit(_data(), model, opt, F.mse_loss, batch_size=BATCH, drop_last=True))
        assert event["engine"] == "python"
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
    reason="needs 2 GPUs and NCCL",
)
def test_native_ddp_on_cuda_with_nccl_equals_ddp_eager(tmp_path):  # pragma: no cover - no GPUs in CI
    results = _spawn(tmp_path, "cuda", timeout=120.0)
    for rank, result in enumerate(results):
        assert "raised" not in result, f"rank {rank}:\n{result['raised']}"
        assert result["cuda"]["engines"] == ["native"] * EPOCHS
        _assert_close(result["cuda"]["hotloop"], result["cuda"]["eager"], atol=1e-5)


def test_a_plain_model_in_a_process_group_trains_alone_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "_told_alone", False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with pytest.warns(UserWarning, match="not wrapped in DistributedDataParallel"):
            event = next(hotloop.fit(_data(), model, opt, F.mse_loss, batch_size=BATCH, drop_last=True))
        assert event["engine"] == "native" and event["updates"] == N // BATCH  # all the data, unsharded
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            next(hotloop.fit(_data(), model, opt, F.mse_loss, batch_size=BATCH, drop_last=True))
    finally:
        dist.destroy_process_group()
