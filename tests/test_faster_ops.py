"""faster_ops: the swapped ops compute bitwise what the originals do, alone and inside a native fit."""

from __future__ import annotations

import copy

import hotloop
import pytest
import torch
from conftest import plain_loop_losses
from hotloop.faster_ops import swap_for_faster
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

_aten = torch.ops.aten


def traced_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq=False):
    def backward(grad, indices):
        return _aten.embedding_dense_backward(grad, indices, num_weights, padding_idx, scale_grad_by_freq)

    return make_fx(backward, tracing_mode="fake")(grad, indices)


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("padding_idx", [-1, 0, 5])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(16, 3, 8), (7, 4), (200, 5, 1)])
def test_embedding_backward_as_index_put_is_bitwise_equal(padding_idx, index_dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape) + padding_idx)
    *lead, width = shape
    indices = torch.randint(0, 10, lead, generator=generator, dtype=index_dtype)
    grad = torch.randn(*lead, width, generator=generator) * 1e3
    if padding_idx >= 0:
        indices.view(-1)[::3] = padding_idx
        grad.view(-1, width)[::3] = float("nan")  # eager ignores the padding index's rows, even NaNs
    gm = traced_backward(grad, indices, 10, padding_idx)
    assert swap_for_faster(gm) == 1
    gm.recompile()
    assert _aten.embedding_dense_backward.default not in targets(gm)
    assert _aten.index_put_.default in targets(gm)
    expected = _aten.embedding_dense_backward(grad, indices, 10, padding_idx, False)
    assert torch.equal(gm(grad, indices), expected)


def test_gradients_that_index_put_would_add_with_atomics_keep_the_op():
    # from 32768 elements index_put_ accumulates floats in parallel, in any order, on several threads
    indices, grad = torch.randint(0, 10, (1024,)), torch.randn(1024, 32)
    gm = traced_backward(grad, indices, 10, -1)
    assert swap_for_faster(gm) == 0
    assert _aten.embedding_dense_backward.default in targets(gm)


def test_scaled_by_frequency_keeps_the_op():
    indices, grad = torch.randint(0, 10, (16,)), torch.randn(16, 4)
    gm = traced_backward(grad, indices, 10, -1, scale_grad_by_freq=True)
    assert swap_for_faster(gm) == 0


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 6, padding_idx=0)
        self.head = nn.Linear(6, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).sum(1))


def test_native_fit_of_an_embedding_model_stays_bitwise_equal_to_the_plain_loop():
    torch.manual_seed(0)
    data = (torch.randint(0, 40, (100, 5)), torch.randn(100, 1))
    model = Bag()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    stream = hotloop.fit(
        data, model, optimizer, nn.MSELoss(), batch_size=16, generator=torch.Generator().manual_seed(3)
    )
    events = [next(stream) for _ in range(3)]
    stream.close()
    steps = 3 * 7  # 100 samples in batches of 16
    expected = plain_loop_losses(
        data, twin, twin_optimizer, nn.MSELoss(), batch_size=16, steps=steps,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert [e["engine"] for e in events] == ["native"] * 3
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-12)
    for (name, ours), theirs in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(model.embed.weight.grad, twin.embed.weight.grad)
