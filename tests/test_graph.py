"""The graph engine's logic that needs no GPU: the engine choice on CPU data and the Dataset's index stream.

The engine itself is tested on a GPU in tests/cuda/test_graph_cuda.py."""

from __future__ import annotations

import copy

import hotloop
import pytest
import torch
from conftest import mlp
from hotloop._native import _C
from torch import nn


def regression():
    torch.manual_seed(0)
    x, y = torch.randn(40, 16), torch.randn(40, 1)
    model = mlp()
    return (x, y), model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_graph_engine_on_cpu_data_says_why():
    data, model, optimizer = regression()
    stream = hotloop.fit(data, model, optimizer, nn.MSELoss(), batch_size=8, engine="graph")
    with pytest.raises(
        RuntimeError, match=r"engine='graph' cannot run this training step: train_data is on cpu"
    ):
        next(stream)


def test_auto_on_cpu_never_tries_the_graph_engine(monkeypatch):
    import hotloop.graph

    def refuse(*args, **kwargs):
        raise AssertionError("the graph engine was tried on CPU data")

    monkeypatch.setattr(hotloop.graph, "graph_engine", refuse)
    monkeypatch.setattr(hotloop.graph, "graph_refusal", refuse)
    data, model, optimizer = regression()
    event = next(hotloop.fit(data, model, optimizer, nn.MSELoss(), batch_size=8))
    assert event["engine"] != "graph"


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_next_indices_visit_the_batches_of_next_batch(shuffle, drop_last):
    x = torch.arange(10.0).unsqueeze(1)
    by_batch = _C.Dataset([x], 4, shuffle, drop_last, torch.Generator().manual_seed(3), False)
    by_index = _C.Dataset([x], 4, shuffle, drop_last, torch.Generator().manual_seed(3), False)
    for _ in range(3 * by_batch.batches_per_epoch):
        (batch,) = by_batch.next_batch()
        indices = by_index.next_indices()
        assert indices.dtype == torch.long
        assert torch.equal(x[indices], batch)
        assert (by_index.batch_index, by_index.epochs_completed) == (
            by_batch.batch_index,
            by_batch.epochs_completed,
        )


def test_graph_names_exist_exactly_in_cuda_builds():
    assert hasattr(_C, "GraphStep") == _C.WITH_CUDA


def test_mixed_precision_runs_in_the_python_engine_on_cpu():
    data, model, optimizer = regression()
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    with pytest.warns(hotloop.SlowPathWarning, match="does not run mixed precision"):
        event = next(
            hotloop.fit(data, model, optimizer, nn.MSELoss(), batch_size=8, amp="bf16", shuffle=False)
        )
    assert event["engine"] == "python"
    total = 0.0
    for index in torch.arange(40).split(8):
        x, y = data[0][index], data[1][index]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.MSELoss()(twin(x), y)
        twin_optimizer.zero_grad()
        loss.backward()
        twin_optimizer.step()
        total += loss.item() * 8
    assert event["train_loss"] == pytest.approx(total / 40)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mixed_precision_options_are_checked():
    data, model, optimizer = regression()
    with pytest.raises(ValueError, match="amp must be one of"):
        next(hotloop.fit(data, model, optimizer, nn.MSELoss(), amp="fp8"))
    with pytest.raises(RuntimeError, match="engine='native' cannot run .*mixed precision"):
        next(hotloop.fit(data, model, optimizer, nn.MSELoss(), amp="fp16", engine="native"))
