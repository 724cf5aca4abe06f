"""fit() options beyond fitstream: train metrics, learning-rate schedules, non-finite losses."""

from __future__ import annotations

import copy

import hotloop
import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_state, mlp, plain_loop_losses
from hotloop.metrics import accuracy
from torch import nn

ENGINES = ["python", "native"]


def classification(n=120, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return (x, y), mlp(10, 16, 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_train_accuracy_is_the_sample_weighted_mean_over_the_window(engine):
    (x, y), model = classification()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    stream = hotloop.fit(
        (x, y),
        model,
        opt,
        nn.CrossEntropyLoss(),
        batch_size=50,
        engine=engine,
        generator=torch.Generator().manual_seed(1),
        metrics={"train_accuracy": "accuracy"},
    )
    events = [next(stream) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    for event in events:
        correct = 0.0
        for index in torch.randperm(120, generator=g).split(50):
            pred = reference(x[index])
            correct += accuracy(pred, y[index]).item() * index.numel()
            loss = nn.functional.cross_entropy(pred, y[index])
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
        assert event["train_accuracy"] == pytest.approx(correct / 120, rel=1e-6)
    assert 0.0 <= events[-1]["train_accuracy"] <= 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_metric_functions_are_accepted(engine):
    (x, y), model = classification()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    event = next(
        hotloop.fit(
            (x, y),
            model,
            opt,
            nn.CrossEntropyLoss(),
            batch_size=30,
            engine=engine,
            metrics={"const": lambda pred, labels: pred.detach().sum() * 0 + 0.5},
        )
    )
    assert event["const"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("metrics", "error", "message"),
    [
        ({"acc": "f1"}, ValueError, "unknown metric name 'f1'"),
        (["accuracy"], TypeError, "metrics must be a dict"),
        ({"acc": 3}, TypeError, "must be callable or a metric name"),
    ],
)
def test_bad_metrics_are_rejected(metrics, error, message):
    (x, y), model = classification()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=message):
        next(hotloop.fit((x, y), model, opt, nn.CrossEntropyLoss(), metrics=metrics))


def plain_loop_with_scheduler(data, model, optimizer, scheduler, epochs, batch_size, generator):
    losses, lrs = [], []
    for _ in range(epochs):
        total = 0.0
        for index in torch.randperm(data[0].shape[0], generator=generator).split(batch_size):
            loss = nn.functional.mse_loss(model(data[0][index]), data[1][index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.step()
            total += loss.item() * index.numel()
        losses.append(total / data[0].shape[0])
    return losses, lrs


@pytest.mark.parametrize("engine", ENGINES)
def test_one_cycle_per_step_matches_a_plain_loop_over_three_epochs(engine):
    torch.manual_seed(0)
    data = (torch.randn(200, 16), torch.randn(200, 1))
    model = mlp()
    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    steps = 3 * 7
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.05, total_steps=steps)
    stream = hotloop.fit(
        data,
        model,
        opt,
        nn.MSELoss(),
        batch_size=32,
        scheduler=sched,
        engine=engine,
        generator=torch.Generator().manual_seed(2),
    )
    events = [next(stream) for _ in range(3)]
    losses, lrs = plain_loop_with_scheduler(
        data, reference, ref_opt, ref_sched, 3, 32, torch.Generator().manual_seed(2)
    )
    assert [e["train_loss"] for e in events] == pytest.approx(losses, rel=1e-6)
    assert [e["lr"] for e in events] == pytest.approx([lrs[7], lrs[14], ref_sched.get_last_lr()[0]])
    assert_same_state(model, reference)
    assert_same_optimizer_state(opt, ref_opt)
    assert sched.state_dict() == ref_sched.state_dict()


@pytest.mark.parametrize("engine", ENGINES)
def test_scheduler_every_event_steps_once_per_window(engine):
    torch.manual_seed(0)
    data = (torch.randn(64, 16), torch.randn(64, 1))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    stream = hotloop.fit(
        data, model, opt, nn.MSELoss(), batch_size=16, scheduler=sched, scheduler_every="event", engine=engine
    )
    assert [next(stream)["lr"] for _ in range(3)] == pytest.approx([0.05, 0.025, 0.0125])


def test_bad_schedulers_are_rejected():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    data = (torch.randn(8, 16), torch.randn(8, 1))
    cases = [
        (torch.optim.lr_scheduler.ReduceLROnPlateau(opt), TypeError, "ReduceLROnPlateau needs a metric"),
        (torch.optim.lr_scheduler.StepLR(other, 1), ValueError, "scheduler must schedule the optimizer"),
        ("cosine", TypeError, "scheduler must be a torch.optim.lr_scheduler"),
    ]
    for scheduler, error, message in cases:
        with pytest.raises(error, match=message):
            next(hotloop.fit(data, model, opt, nn.MSELoss(), scheduler=scheduler))
    with pytest.raises(ValueError, match="scheduler_every must be one of"):
        next(hotloop.fit(data, model, opt, nn.MSELoss(), scheduler_every="epoch"))


class PoisonAt(nn.Module):
    """Linear model whose loss becomes NaN on the batch holding sample `poison`."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def poisoned(poison_row: int):
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randn(40, 1)
    x[poison_row] = float("nan")
    model = PoisonAt()
    return (x, y), model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_loss_raises_naming_the_step_and_keeps_the_last_finite_weights(engine):
    data, model, opt = poisoned(poison_row=25)  # unshuffled, batch 10: the 3rd step of epoch 1
    stream = hotloop.fit(data, model, opt, nn.MSELoss(), batch_size=10, shuffle=False, engine=engine)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    plain_loop_losses(data, reference, ref_opt, nn.MSELoss(), batch_size=10, steps=2, shuffle=False)
    with pytest.raises(hotloop.NonFiniteLossError, match="non-finite loss at optimizer step 3") as info:
        next(stream)
    assert info.value.step == 3
    assert_same_state(model, reference, rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_stop_yields_a_last_event_then_ends(engine):
    data, model, opt = poisoned(poison_row=25)
    stream = hotloop.fit(
        data,
        model,
        opt,
        nn.MSELoss(),
        batch_size=10,
        shuffle=False,
        every=1,
        engine=engine,
        on_nonfinite="stop",
    )
    events = list(stream)
    assert [e["updates"] for e in events] == [1, 2, 2]
    assert events[-1]["nonfinite_step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_continue_trains_on_like_a_plain_loop(engine):
    data, model, opt = poisoned(poison_row=25)
    event = next(
        hotloop.fit(
            data,
            model,
            opt,
            nn.MSELoss(),
            batch_size=10,
            shuffle=False,
            engine=engine,
            on_nonfinite="continue",
        )
    )
    assert event["updates"] == 4
    assert not torch.isfinite(model.linear.weight).all()


def test_builtin_label_metrics_need_labels():
    model = mlp(6, 4, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="compares predictions with labels, so it needs labels"):
        next(
            hotloop.fit(
                (torch.randn(8, 6),),
                model,
                opt,
                lambda p: p.pow(2).mean(),
                last_label=False,
                metrics={"acc": "accuracy"},
            )
        )


def test_a_failing_metric_fails_before_the_update():
    (x, y), model = classification()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken(pred, labels):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        next(
            hotloop.fit(
                (x, y),
                model,
                opt,
                nn.CrossEntropyLoss(),
                batch_size=30,
                engine="python",
                metrics={"bad": broken},
            )
        )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_step_counts_from_the_start_of_the_run_after_resume(engine):
    data, model, opt = poisoned(poison_row=35)  # unshuffled, batch 10: the 4th step
    options = dict(batch_size=10, shuffle=False, every=2, engine=engine)
    stream = hotloop.fit(data, model, opt, nn.MSELoss(), **options)
    assert next(stream)["updates"] == 2
    state = stream.state_dict()
    stream.close()
    resumed = hotloop.fit(data, model, opt, nn.MSELoss(), resume=state, **options)
    with pytest.raises(hotloop.NonFiniteLossError, match="non-finite loss at optimizer step 4;") as info:
        next(resumed)
    assert info.value.step == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_the_run_can_be_checkpointed_after_a_nonfinite_error(engine):
    data, model, opt = poisoned(poison_row=25)
    stream = hotloop.fit(data, model, opt, nn.MSELoss(), batch_size=10, shuffle=False, engine=engine)
    with pytest.raises(hotloop.NonFiniteLossError):
        next(stream)
    state = stream.state_dict()
    assert state["updates"] == 2 and state["batch_index"] == 3
    stream.close()
    with pytest.raises(RuntimeError, match="after the stream was closed"):
        stream.state_dict()
