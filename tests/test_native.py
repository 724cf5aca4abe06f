"""The native engine: parity with a plain PyTorch loop, engine choice and fallback, no Python per step."""

from __future__ import annotations

import copy
import itertools
import sys
import warnings

import hotloop
import pytest
import torch
from conftest import TwoInputs, assert_same_optimizer_state, assert_same_state, mlp, plain_loop_losses
from torch import nn

RTOL = 1e-5


class Bag(nn.Module):
    """Integer inputs only: token ids -> mean embedding -> classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def reconstruction_loss(reconstruction: torch.Tensor) -> torch.Tensor:
    return reconstruction.pow(2).mean()


def regression():
    torch.manual_seed(0)
    model = mlp()
    return (
        (torch.randn(200, 16), torch.randn(200, 1)),
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        nn.MSELoss(),
        True,
    )


def embedding():
    torch.manual_seed(1)
    model = Bag()
    data = (torch.randint(0, 50, (130, 7)), torch.randint(0, 4, (130,)))
    return data, model, torch.optim.AdamW(model.parameters(), lr=1e-2), nn.CrossEntropyLoss(), True


def conv_batchnorm():
    torch.manual_seed(2)
    model = ConvBN()
    data = (torch.randn(90, 1, 8, 8), torch.randint(0, 3, (90,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return data, model, optimizer, nn.CrossEntropyLoss(), True


def multi_input():
    torch.manual_seed(3)
    model = TwoInputs()
    data = (torch.randn(120, 5), torch.randint(0, 10, (120,)), torch.randint(0, 3, (120,)))
    return data, model, torch.optim.Adam(model.parameters(), lr=1e-2), nn.functional.cross_entropy, True


def unlabelled():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6))
    return (
        (torch.randn(90, 6),),
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        reconstruction_loss,
        False,
    )


WORKLOADS = {
    "regression": regression,
    "embedding": embedding,
    "conv_batchnorm": conv_batchnorm,
    "multi_input": multi_input,
    "unlabelled": unlabelled,
}


def train_both(data, model, optimizer, loss_fn, last_label, *, batch_size, epochs=3, every=None, **options):
    """Train `model` natively and a twin with the plain loop on the same batches; returns both sides."""
    twin = copy.deepcopy(model)
    twin_optimizer = twin_of(optimizer, model, twin)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        loss_fn,
        batch_size=batch_size,
        last_label=last_label,
        generator=torch.Generator().manual_seed(7),
        engine="native",
        every=every,
        **options,
    )
    events = list(itertools.islice(stream, epochs))
    stream.close()
    steps = events[-1]["updates"]
    expected = plain_loop_losses(
        data,
        twin,
        twin_optimizer,
        loss_fn,
        batch_size=batch_size,
        steps=steps,
        every=every,
        last_label=last_label,
        generator=torch.Generator().manual_seed(7),
        drop_last=options.get("drop_last", False),
        shuffle=options.get("shuffle", True),
    )
    return events, expected, twin, twin_optimizer


def twin_of(optimizer: torch.optim.Optimizer, model: nn.Module, twin: nn.Module) -> torch.optim.Optimizer:
    """The same (fresh) optimizer over `twin`'s parameters, param groups and options included."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    twin_params = list(twin.parameters())
    groups = [
        {
            **{k: v for k, v in group.items() if k != "params"},
            "params": [twin_params[position[id(p)]] for p in group["params"]],
        }
        for group in optimizer.param_groups
    ]
    twin_optimizer = type(optimizer)(groups)
    twin_optimizer.defaults = dict(optimizer.defaults)  # what add_param_group fills in
    return twin_optimizer


def assert_relatively_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL
) -> None:
    """Within `rtol` of the reference tensor's largest magnitude.

    The captured graph itself is bitwise equal to eager autograd on CPU; the native optimizer's fused
    kernels differ from torch.optim's default for-loop by float32 rounding, which steps compound, so
    elements near zero are compared on the tensor's scale rather than their own.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale + 1e-12, f"{what}: max difference {error:.3g} on a scale of {scale:.3g}"


def assert_parity(events, expected, model, optimizer, twin, twin_optimizer):
    assert all(event["engine"] == "native" for event in events)
    losses = [event["train_loss"] for event in events]
    assert losses == pytest.approx(expected, rel=RTOL)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert_relatively_close(ours[key], theirs[key], key)
    ours, theirs = optimizer.state_dict(), twin_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in ours["state"].items():
        assert state.keys() == theirs["state"][index].keys()
        for name, value in state.items():
            assert_relatively_close(value, theirs["state"][index][name], f"state {index} {name}")
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        # as after a plain loop's optimizer.step(): the last batch's gradient
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_relatively_close(p.grad, q.grad, f"{name}.grad")
            assert p.grad.stride() == q.grad.stride(), name


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_parity_with_plain_loop(workload):
    data, model, optimizer, loss_fn, last_label = WORKLOADS[workload]()
    results = train_both(data, model, optimizer, loss_fn, last_label, batch_size=16)
    assert_parity(*results[:2], model, optimizer, *results[2:])


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum_dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.1),
    "sgd_nesterov_decay": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.5, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad_decay": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adam_betas_eps": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "adamw_maximize": lambda p: torch.optim.AdamW(p, lr=1e-3, maximize=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer(name):
    torch.manual_seed(5)
    # no bias before BatchNorm: its gradient is rounding noise, which Adam would amplify into chaos
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = OPTIMIZERS[name](model.parameters())
    data = (torch.randn(100, 16), torch.randn(100, 1))
    results = train_both(data, model, optimizer, nn.MSELoss(), True, batch_size=16)
    assert_parity(*results[:2], model, optimizer, *results[2:])


def test_param_groups_with_their_own_options():
    torch.manual_seed(6)
    model = mlp()
    optimizer = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": model[2].parameters(), "weight_decay": 0.1},
        ],
        lr=1e-3,
    )
    data = (torch.randn(100, 16), torch.randn(100, 1))
    results = train_both(data, model, optimizer, nn.MSELoss(), True, batch_size=32)
    assert_parity(*results[:2], model, optimizer, *results[2:])


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 32},  # 200 = 6 * 32 + 8: full-batch graph and last-batch graph
        {"batch_size": 40},  # no smaller last batch
        {"batch_size": 32, "drop_last": True},
        {"batch_size": 32, "shuffle": False},
        {"batch_size": 500},  # one batch of all samples
        {"batch_size": 32, "every": 5},  # windows cross epoch ends
    ],
    ids=["tail", "even", "drop_last", "no_shuffle", "one_batch", "every"],
)
def test_batching_options(options):
    data, model, optimizer, loss_fn, last_label = regression()
    results = train_both(data, model, optimizer, loss_fn, last_label, **options)
    assert_parity(*results[:2], model, optimizer, *results[2:])


def test_frozen_parameter_and_parameter_outside_the_optimizer():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)  # frozen: no gradient, never stepped
    # model[0].bias is trainable but not in the optimizer: a plain loop's zero_grad() never clears it,
    # so its .grad sums over every step
    optimizer = torch.optim.SGD([*model[2].parameters(), *model[4].parameters()], lr=0.05)
    data = (torch.randn(100, 16), torch.randn(100, 1))
    results = train_both(data, model, optimizer, nn.MSELoss(), True, batch_size=16)
    assert_parity(*results[:2], model, optimizer, *results[2:])


def test_buffers_are_updated_in_the_users_tensors():
    data, model, optimizer, loss_fn, last_label = conv_batchnorm()
    buffers = {name: b for name, b in model.named_buffers()}
    params = {name: p for name, p in model.named_parameters()}
    before = {name: b.clone() for name, b in buffers.items()}
    stream = hotloop.fit(data, model, optimizer, loss_fn, batch_size=16, engine="native")
    next(stream)
    stream.close()
    for name, b in model.named_buffers():
        assert b is buffers[name]
        assert not torch.equal(b, before[name]), name
    assert model.features[1].num_batches_tracked.item() == 6
    for name, p in model.named_parameters():
        assert p is params[name]


def test_changing_lr_between_events_takes_effect():
    data, model, optimizer, loss_fn, last_label = regression()
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        loss_fn,
        batch_size=32,
        engine="native",
        generator=torch.Generator().manual_seed(1),
    )
    reference = torch.Generator().manual_seed(1)
    for lr in (1e-2, 1e-3, 0.0):
        optimizer.param_groups[0]["lr"] = lr
        twin_optimizer.param_groups[0]["lr"] = lr
        event = next(stream)
        (expected,) = plain_loop_losses(
            data, twin, twin_optimizer, loss_fn, batch_size=32, steps=7, generator=reference
        )
        assert event["train_loss"] == pytest.approx(expected, rel=RTOL)
    stream.close()
    assert_same_state(model, twin, rtol=RTOL)


def test_continue_with_a_plain_loop_after_native_windows():
    data, model, optimizer, loss_fn, last_label = regression()
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        loss_fn,
        batch_size=32,
        engine="native",
        generator=torch.Generator().manual_seed(2),
    )
    next(stream)
    stream.close()
    plain_loop_losses(
        data,
        twin,
        twin_optimizer,
        loss_fn,
        batch_size=32,
        steps=7,
        generator=torch.Generator().manual_seed(2),
    )
    more = torch.Generator().manual_seed(3)
    plain_loop_losses(data, model, optimizer, loss_fn, batch_size=32, steps=7, generator=more)
    plain_loop_losses(
        data,
        twin,
        twin_optimizer,
        loss_fn,
        batch_size=32,
        steps=7,
        generator=torch.Generator().manual_seed(3),
    )
    assert_same_state(model, twin, rtol=RTOL)
    assert_same_optimizer_state(optimizer, twin_optimizer, rtol=RTOL)


def test_train_metrics():
    data, model, optimizer, loss_fn, last_label = conv_batchnorm()

    def accuracy(pred, labels):
        return (pred.argmax(1) == labels).float().mean()

    results = train_both(
        data,
        model,
        optimizer,
        loss_fn,
        last_label,
        batch_size=16,
        epochs=1,
        metrics={"train_accuracy": accuracy},
    )
    events = results[0]
    assert events[0]["engine"] == "native"
    assert 0.0 <= events[0]["train_accuracy"] <= 1.0

    twin_data, twin, twin_optimizer, _, _ = conv_batchnorm()
    stream = hotloop.fit(
        twin_data,
        twin,
        twin_optimizer,
        loss_fn,
        batch_size=16,
        engine="python",
        generator=torch.Generator().manual_seed(7),
        metrics={"train_accuracy": accuracy},
    )
    assert events[0]["train_accuracy"] == pytest.approx(next(stream)["train_accuracy"], rel=1e-6)
    stream.close()


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_dropout_trains_with_dropout_and_evaluates_without():
    torch.manual_seed(9)
    model = Dropped()
    data = (torch.randn(256, 16), torch.randn(256, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every batch sees the same weights
    stream = hotloop.fit(data, model, optimizer, nn.MSELoss(), batch_size=256, shuffle=False, engine="native")
    losses = [next(stream)["train_loss"] for _ in range(20)]
    stream.close()
    # a new mask each step: the losses vary, around the mean of eager training-mode losses
    assert len(set(losses)) == len(losses)
    with torch.no_grad():
        model.train()
        eager = torch.tensor([nn.functional.mse_loss(model(data[0]), data[1]).item() for _ in range(200)])
        model.eval()
        evaluated = nn.functional.mse_loss(model(data[0]), data[1]).item()
    mean, spread = eager.mean().item(), eager.std().item()
    assert abs(torch.tensor(losses).mean().item() - mean) < 4 * spread / len(losses) ** 0.5 + 1e-6
    assert all(loss != pytest.approx(evaluated, rel=1e-6) for loss in losses)
    assert not model.training  # fit() left the mode we set; it trains in train mode only inside windows


def test_dropout_draws_from_the_default_generator():
    # On CPU the captured dropout draws the same numbers as eager dropout: parity with a plain loop holds
    # when both start from the same global seed (documented as not guaranteed in general).
    torch.manual_seed(10)
    model = Dropped()
    data = (torch.randn(128, 16), torch.randn(128, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = hotloop.fit(
            data,
            model,
            optimizer,
            nn.MSELoss(),
            batch_size=32,
            engine="auto",
            generator=torch.Generator().manual_seed(1),
        )
        torch.manual_seed(11)
        events = [next(stream) for _ in range(2)]
    stream.close()
    torch.manual_seed(11)
    expected = plain_loop_losses(
        data,
        twin,
        twin_optimizer,
        nn.MSELoss(),
        batch_size=32,
        steps=8,
        generator=torch.Generator().manual_seed(1),
    )
    assert [e["engine"] for e in events] == ["native", "native"]
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=RTOL)
    assert_same_state(model, twin, rtol=RTOL)


def test_non_finite_loss_is_not_applied():
    torch.manual_seed(12)
    model = mlp()
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    y[40] = float("nan")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    stream = hotloop.fit(
        (x, y),
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=8,
        shuffle=False,
        engine="native",
        on_nonfinite="stop",
    )
    event = next(stream)
    assert event["engine"] == "native"
    assert event["nonfinite_step"] == 6
    assert event["updates"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.state_dict()["state"][0]["step"].item() == 5


# --- engine choice and fallback ---------------------------------------------------------------------


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


class CountingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x * 2 if self.calls % 2 else x)


FALLBACKS = {
    "optimizer": (lambda: mlp(), lambda m: torch.optim.Adafactor(m.parameters()), "Adafactor is not native"),
    "data_dependent": (DataBranch, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "data-dependent"),
    "python_state": (
        CountingBranch,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "changes Python state .model attribute 'calls'.",
    ),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_auto_falls_back_with_one_warning_saying_why(case):
    make_model, make_optimizer, reason = FALLBACKS[case]
    model = make_model()
    data = (torch.randn(64, 16), torch.randn(64, 1))
    with pytest.warns(hotloop.SlowPathWarning, match=reason) as record:
        stream = hotloop.fit(data, model, make_optimizer(model), nn.MSELoss(), batch_size=16)
        event = next(stream)
        next(stream)
    stream.close()
    assert event["engine"] == "python"
    assert len([w for w in record if issubclass(w.category, hotloop.SlowPathWarning)]) == 1


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_native_that_cannot_run_raises_the_same_reason(case):
    make_model, make_optimizer, reason = FALLBACKS[case]
    model = make_model()
    data = (torch.randn(64, 16), torch.randn(64, 1))
    stream = hotloop.fit(data, model, make_optimizer(model), nn.MSELoss(), batch_size=16, engine="native")
    with pytest.raises(RuntimeError, match=reason):
        next(stream)


def test_auto_picks_native_on_cpu_without_warning():
    data, model, optimizer, loss_fn, _ = regression()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = hotloop.fit(data, model, optimizer, loss_fn, batch_size=32)
        assert next(stream)["engine"] == "native"
    stream.close()


# --- no Python per step -----------------------------------------------------------------------------


def test_no_python_runs_per_step():
    def python_calls_in_a_window(every: int) -> list[str]:
        torch.manual_seed(13)
        model = mlp()
        data = (torch.randn(4096, 16), torch.randn(4096, 1))
        stream = hotloop.fit(
            data,
            model,
            torch.optim.Adam(model.parameters()),
            nn.MSELoss(),
            batch_size=8,
            engine="native",
            every=every,
        )
        next(stream)  # capture (and its eager check) happen here
        names: list[str] = []

        def profile(frame, event, arg):
            if event == "call":
                names.append(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            event = next(stream)
        finally:
            sys.setprofile(None)
        stream.close()
        assert event["engine"] == "native" and event["updates"] == 2 * every
        assert "forward" not in names and "mse_loss" not in names  # neither ran during the window
        return names

    # The Python that does run (the event, the optimizer's configuration) is the same for a window of
    # 4 steps as for one of 400: none of it is per step.
    assert len(python_calls_in_a_window(4)) == len(python_calls_in_a_window(400))


def test_buffer_replaced_between_events_is_followed():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    data = (torch.randn(64, 16), torch.randn(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    twin = copy.deepcopy(model)
    twin_optimizer = twin_of(optimizer, model, twin)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=16,
        engine="native",
        generator=torch.Generator().manual_seed(3),
    )
    reference = torch.Generator().manual_seed(3)
    next(stream)
    plain_loop_losses(data, twin, twin_optimizer, nn.MSELoss(), batch_size=16, steps=4, generator=reference)
    model[1].running_mean = torch.full((8,), 0.5)  # a new tensor, not an in-place update
    twin[1].running_mean = torch.full((8,), 0.5)
    event = next(stream)
    stream.close()
    (expected,) = plain_loop_losses(
        data, twin, twin_optimizer, nn.MSELoss(), batch_size=16, steps=4, generator=reference
    )
    assert event["train_loss"] == pytest.approx(expected, rel=RTOL)
    assert_same_state(model, twin, rtol=RTOL)


def test_changed_trainable_set_stops_with_a_clear_error():
    data, model, optimizer, loss_fn, _ = regression()
    stream = hotloop.fit(data, model, optimizer, loss_fn, batch_size=32, engine="native")
    next(stream)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="0.weight"):
        next(stream)


def test_stub_covers_the_extension():
    import ast
    from pathlib import Path

    from hotloop._native import _C

    stub = ast.parse((Path(hotloop.__file__).parent / "_C.pyi").read_text())
    declared: dict[str, set[str]] = {}
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            declared[node.name] = {
                n.target.id if isinstance(n, ast.AnnAssign) else n.name
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AnnAssign))
            }
        elif isinstance(node, ast.AnnAssign):
            declared[node.target.id] = set()
    exported = {name for name in dir(_C) if not name.startswith("_")}
    assert exported <= set(declared), exported - set(declared)
    for name in exported:
        kind = getattr(_C, name)
        if isinstance(kind, type):
            own = {k for k in vars(kind) if not k.startswith("_")}
            assert own <= declared[name], f"{name}: {own - declared[name]}"


SCHEDULERS = {
    "step_lr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("every", [None, 5])
def test_per_step_scheduler(name, every):
    torch.manual_seed(15)
    model = mlp()
    data = (torch.randn(100, 16), torch.randn(100, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin = copy.deepcopy(model)
    twin_optimizer = twin_of(optimizer, model, twin)
    scheduler, twin_scheduler = SCHEDULERS[name](optimizer), SCHEDULERS[name](twin_optimizer)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=32,
        every=every,
        engine="native",
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(4),
    )
    events = [next(stream) for _ in range(3)]
    stream.close()

    def batches():
        reference = torch.Generator().manual_seed(4)
        while True:
            yield from torch.randperm(100, generator=reference).split(32)

    losses, total, samples = [], 0.0, 0
    batches_per_window = [5] * 3 if every is not None else [4] * 3
    order = batches()
    for count in batches_per_window:
        for index in itertools.islice(order, count):
            loss = nn.functional.mse_loss(twin(data[0][index]), data[1][index])
            twin_optimizer.zero_grad()
            loss.backward()
            twin_optimizer.step()
            twin_scheduler.step()
            total, samples = total + loss.item() * len(index), samples + len(index)
        losses.append(total / samples)
        total, samples = 0.0, 0
    assert [e["engine"] for e in events] == ["native"] * 3
    assert [e["train_loss"] for e in events] == pytest.approx(losses, rel=RTOL)
    assert [e["lr"] for e in events][-1] == pytest.approx(twin_optimizer.param_groups[0]["lr"], rel=1e-12)
    assert scheduler.state_dict()["last_epoch"] == twin_scheduler.state_dict()["last_epoch"]
    assert_same_state(model, twin, rtol=RTOL)


def test_scheduler_settles_where_a_window_stopped_early():
    def run(engine):
        torch.manual_seed(16)
        model = mlp()
        x, y = torch.randn(64, 16), torch.randn(64, 1)
        y[44] = float("inf")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        stream = hotloop.fit(
            (x, y),
            model,
            optimizer,
            nn.MSELoss(),
            batch_size=8,
            shuffle=False,
            engine=engine,
            scheduler=scheduler,
            on_nonfinite="stop",
        )
        event = next(stream)
        return event, scheduler.state_dict()["last_epoch"], optimizer.param_groups[0]["lr"], model

    native, python = run("native"), run("python")
    assert native[0]["engine"] == "native" and python[0]["engine"] == "python"
    assert native[0]["nonfinite_step"] == python[0]["nonfinite_step"] == 6
    assert native[1:3] == python[1:3] == (5, 1e-2 * 0.5**2)
    assert_same_state(native[3], python[3], rtol=RTOL)


@pytest.mark.parametrize("shuffle", [True, False])
def test_non_contiguous_train_data(shuffle):
    torch.manual_seed(17)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 1)
    )
    x = torch.randn(70, 3, 6, 6).to(memory_format=torch.channels_last)
    y = torch.randn(1, 70).t()  # a transposed view
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    results = train_both(
        (x, y), model, optimizer, nn.MSELoss(), True, batch_size=16, epochs=2, shuffle=shuffle
    )
    assert_parity(*results[:2], model, optimizer, *results[2:])


def test_param_group_added_between_events():
    torch.manual_seed(18)
    model = mlp()
    data = (torch.randn(100, 16), torch.randn(100, 1))
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)
    twin = copy.deepcopy(model)
    twin_optimizer = twin_of(optimizer, model, twin)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=32,
        engine="native",
        generator=torch.Generator().manual_seed(5),
    )
    reference = torch.Generator().manual_seed(5)
    next(stream)
    plain_loop_losses(data, twin, twin_optimizer, nn.MSELoss(), batch_size=32, steps=4, generator=reference)
    optimizer.add_param_group({"params": model[0].parameters(), "lr": 0.01})
    twin_optimizer.add_param_group({"params": twin[0].parameters(), "lr": 0.01})
    event = next(stream)
    stream.close()
    (expected,) = plain_loop_losses(
        data, twin, twin_optimizer, nn.MSELoss(), batch_size=32, steps=4, generator=reference
    )
    assert event["train_loss"] == pytest.approx(expected, rel=RTOL)
    assert_same_state(model, twin, rtol=RTOL)
    torch.testing.assert_close(model[0].weight.grad, twin[0].weight.grad)
