"""The graph engine's logic that needs no GPU: the engine choice on CPU data and the Dataset's index stream.

The engine itself is tested on a GPU in tests/cuda/test_graph.py."""

from __future__ import annotations

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
