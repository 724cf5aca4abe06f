"""memory_format: the native engine runs convolutions in channels_last on copies, to a stated tolerance of the
plain loop, and the user's tensors keep their layout; "preserve" keeps the plain loop's rounding exactly."""

from __future__ import annotations

import copy
import itertools

import hotloop
import pytest
import torch
from conftest import plain_loop_losses
from hotloop import layouts, op_capture
from hotloop.speed_rules import channels_last_faster
from torch import nn

# The stated tolerance of a channels_last run against the plain (contiguous) loop: each tensor within this
# fraction of its largest magnitude (measured: 1.6e-6 after 21 and after 210 Adam steps on small_cnn).
RTOL = 1e-5


def small_cnn() -> nn.Module:
    # No bias before BatchNorm: its gradient is zero up to rounding, which Adam would scale up to full
    # steps of noise in any two implementations that round differently.
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    )  # fmt: skip


def cnn_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(100, 2, 14, 14, generator=g), torch.randint(0, 5, (100,), generator=g)


@pytest.fixture
def captures(monkeypatch):
    """The channels_last flag of every capture the native engine makes."""
    seen: list[bool] = []
    capture = op_capture.capture_step

    def spy(*args, **kwargs):
        seen.append(kwargs.get("channels_last", False))
        return capture(*args, **kwargs)

    monkeypatch.setattr(op_capture, "capture_step", spy)
    return seen


def train(model, optimizer, memory_format, epochs=3, **options):
    stream = hotloop.fit(
        cnn_data(),
        model,
        optimizer,
        nn.CrossEntropyLoss(),
        batch_size=16,
        generator=torch.Generator().manual_seed(7),
        engine="native",
        memory_format=memory_format,
        **options,
    )
    events = list(itertools.islice(stream, epochs))
    stream.close()
    return events


def reference(model, optimizer_of, steps):
    twin = copy.deepcopy(model)
    twin_optimizer = optimizer_of(twin)
    losses = plain_loop_losses(
        cnn_data(),
        twin,
        twin_optimizer,
        nn.CrossEntropyLoss(),
        batch_size=16,
        steps=steps,
        generator=torch.Generator().manual_seed(7),
    )
    return losses, twin, twin_optimizer


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if not actual.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else float("inf")
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def test_auto_runs_channels_last_within_the_stated_tolerance_and_keeps_the_users_layouts(captures):
    model = small_cnn()
    before = {name: (p, p.stride()) for name, p in model.named_parameters()}
    expected, twin, twin_optimizer = reference(model, adam, steps=3 * 7)
    optimizer = adam(model)
    events = train(model, optimizer, "auto")
    assert captures == [True]
    assert [e["engine"] for e in events] == ["native"] * 3
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=RTOL)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        tensor, stride = before[name]
        assert p is tensor and p.stride() == stride == q.stride(), name
        assert p.grad.stride() == q.grad.stride(), name
        assert relative_error(p, q) <= RTOL, name
        assert relative_error(p.grad, q.grad) <= RTOL, name
    ours, theirs = model.state_dict(), twin.state_dict()
    for key in ours:
        assert ours[key].stride() == theirs[key].stride(), key
        assert relative_error(ours[key], theirs[key]) <= RTOL, key
    ours, theirs = optimizer.state_dict()["state"], twin_optimizer.state_dict()["state"]
    for index, state in ours.items():
        for name, value in state.items():
            other = theirs[index][name]
            assert value.stride() == other.stride(), (index, name)
            assert relative_error(value, other) <= RTOL, (index, name)


def test_preserve_keeps_the_plain_loops_rounding_exactly(captures):
    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model = small_cnn()
    expected, twin, _ = reference(model, sgd, steps=2 * 7)
    events = train(model, sgd(model), "preserve", epochs=2)
    assert captures == [False]
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


def test_a_channels_last_model_stays_channels_last(captures):
    model = small_cnn().to(memory_format=torch.channels_last)
    conv = model[3].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    expected, twin, _ = reference(model, adam, steps=7)
    train(model, adam(model), "auto", epochs=1)
    assert model[3].weight is conv and conv.is_contiguous(memory_format=torch.channels_last)
    assert conv.grad.stride() == conv.stride()
    for key, value in model.state_dict().items():
        assert relative_error(value, twin.state_dict()[key]) <= RTOL, key


def test_explicit_channels_last_runs_a_model_the_rule_leaves_alone(captures):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 14 * 14, 5))
    train(model, adam(model), "auto", epochs=1)
    train(model, adam(model), "channels_last", epochs=1)
    assert captures == [False, True]


@pytest.mark.parametrize("user_layout", [torch.contiguous_format, torch.channels_last])
def test_dropout_draws_the_plain_loops_masks(captures, user_layout):
    """Eager dropout draws its mask in the input's memory order. Whatever order the channels_last graph
    would draw in, the capture check compares it with an eager step of the user's model: a graph that
    drew other numbers is refused and "auto" captures in the user's layout instead."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Dropout(0.3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 5)
    ).to(memory_format=user_layout)
    torch.manual_seed(11)
    expected, twin, _ = reference(model, adam, steps=14)
    torch.manual_seed(11)
    events = train(model, adam(model), "auto", epochs=2)
    assert captures[0] is True and captures in ([True], [True, False])
    assert [e["engine"] for e in events] == ["native"] * 2
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-5)
    for key, value in model.state_dict().items():
        assert relative_error(value, twin.state_dict()[key]) <= RTOL, key


@pytest.mark.parametrize("value", ["channels-last", torch.channels_last, None, "contiguous"])
def test_bad_memory_format_names_the_argument(value):
    model = small_cnn()
    stream = hotloop.fit(cnn_data(), model, adam(model), nn.CrossEntropyLoss(), memory_format=value)
    with pytest.raises(ValueError, match="memory_format must be one of 'auto', 'preserve', 'channels_last'"):
        next(stream)


def test_rule_picks_convolutions_on_the_cpu():
    assert channels_last_faster(small_cnn(), torch.device("cpu"))
    assert not channels_last_faster(nn.Linear(3, 2), torch.device("cpu"))
    assert not channels_last_faster(small_cnn(), torch.device("cuda"))


def test_channels_last_graph_converts_the_flattened_gradient_for_pooling():
    model = small_cnn()
    x, y = cnn_data()
    batch = [x[:16], y[:16]]
    gm = op_capture.trace_step(model, nn.CrossEntropyLoss(), batch, last_label=True, channels_last=True)
    pool_backward = [
        n for n in gm.graph.nodes if n.target is torch.ops.aten.max_pool2d_with_indices_backward.default
    ]
    assert pool_backward
    for node in pool_backward:
        grad, source = node.args[0].meta["val"], node.args[1].meta["val"]
        assert grad.is_contiguous(memory_format=torch.channels_last) == source.is_contiguous(
            memory_format=torch.channels_last
        )
    assert layouts.match_layouts(gm) == 0  # nothing left to convert


def test_to_channels_last_copies_weights_and_leaves_other_tensors():
    weight = torch.randn(8, 1, 3, 3)
    copied = layouts.to_channels_last(weight, copy=True)
    assert copied is not weight and copied.stride() == (9, 1, 3, 1) and torch.equal(copied, weight)
    batch = torch.randn(4, 1, 5, 5)
    assert layouts.to_channels_last(batch, copy=False) is batch  # one channel: already laid out so
    labels = torch.zeros(4, 1, 5, 5, dtype=torch.long)
    assert layouts.to_channels_last(labels, copy=True) is labels
