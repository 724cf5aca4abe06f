"""Every native optimizer through fit(): plain-loop parity, resume, lr changes, engine choice; and LBFGS."""

from __future__ import annotations

import copy
import itertools
import warnings

import hotloop
import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_state, mlp, plain_loop_losses
from test_optim_more import CASES, OPTIONS
from torch import nn

optim = torch.optim
RTOL = 1e-5  # the native engine's tolerance (tests/test_native.py); the optimizers alone are bitwise


def workload(seed=0):
    torch.manual_seed(seed)
    # 50 = 3 * 16 + 2: the full-batch graph and the last-batch graph both run
    return (torch.randn(50, 6), torch.randn(50, 1)), mlp(6, 8, 1), nn.MSELoss()


def make(name, params, **options):
    return getattr(optim, name)(params, lr=0.01, **options)


def fit_both(name, options, *, events=2, engine="native", every=None, **fit_options):
    """fit() and the plain loop (same batches) from the same weights; returns both sides after `events`."""
    data, model, loss_fn = workload()
    twin = copy.deepcopy(model)
    opt, twin_opt = make(name, model.parameters(), **options), make(name, twin.parameters(), **options)
    stream = hotloop.fit(
        data,
        model,
        opt,
        loss_fn,
        batch_size=16,
        every=every,
        engine=engine,
        generator=torch.Generator().manual_seed(7),
        **fit_options,
    )
    got = list(itertools.islice(stream, events))
    stream.close()
    expected = plain_loop_losses(
        data,
        twin,
        twin_opt,
        loss_fn,
        batch_size=16,
        steps=got[-1]["updates"],
        every=every,
        generator=torch.Generator().manual_seed(7),
    )
    return got, expected, (model, opt), (twin, twin_opt)


def assert_parity(got, expected, ours, theirs, engine="native"):
    assert [event["engine"] for event in got] == [engine] * len(got)
    assert [event["train_loss"] for event in got] == pytest.approx(expected, rel=RTOL)
    assert_same_state(ours[0], theirs[0], rtol=RTOL)
    assert_same_optimizer_state(ours[1], theirs[1], rtol=RTOL)


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_native_fit_matches_plain_loop(name, options):
    got, expected, ours, theirs = fit_both(name, options)
    assert_parity(got, expected, ours, theirs)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_auto_picks_native_without_warning(name):
    data, model, loss_fn = workload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = hotloop.fit(data, model, make(name, model.parameters()), loss_fn, batch_size=16)
        assert next(stream)["engine"] == "native"
    stream.close()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_resume_equals_an_uninterrupted_run(name):
    data, model, loss_fn = workload()
    opt = make(name, model.parameters())
    stream = hotloop.fit(data, model, opt, loss_fn, batch_size=16, every=3, engine="native")
    next(stream)
    state = stream.state_dict()
    full = [next(stream)["train_loss"] for _ in range(3)]
    stream.close()

    _, resumed_model, _ = workload(seed=1)  # other weights: resume loads them
    resumed_opt = make(name, resumed_model.parameters())
    resumed = hotloop.fit(
        data, resumed_model, resumed_opt, loss_fn, batch_size=16, every=3, engine="native", resume=state
    )
    assert [next(resumed)["train_loss"] for _ in range(3)] == full
    resumed.close()
    assert_same_state(resumed_model, model, rtol=0, atol=0)
    assert_same_optimizer_state(resumed_opt, opt, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_lr_changed_between_events_is_honoured(name):
    data, model, loss_fn = workload()
    twin = copy.deepcopy(model)
    opt, twin_opt = make(name, model.parameters()), make(name, twin.parameters())
    stream = hotloop.fit(
        data, model, opt, loss_fn, batch_size=16, engine="native", generator=torch.Generator().manual_seed(1)
    )
    reference = torch.Generator().manual_seed(1)
    for lr in (0.01, 0.05, 0.002):
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"] = lr
        event = next(stream)
        (expected,) = plain_loop_losses(
            data, twin, twin_opt, loss_fn, batch_size=16, steps=4, generator=reference
        )
        assert event["train_loss"] == pytest.approx(expected, rel=RTOL)
    stream.close()
    assert_same_state(model, twin, rtol=RTOL)
    assert_same_optimizer_state(opt, twin_opt, rtol=RTOL)


@pytest.mark.parametrize("name", ["RMSprop", "NAdam", "ASGD", "Rprop"])
def test_per_step_scheduler(name):
    data, model, loss_fn = workload()
    twin = copy.deepcopy(model)
    options = {"momentum": 0.9} if name == "RMSprop" else {}
    opt, twin_opt = make(name, model.parameters(), **options), make(name, twin.parameters(), **options)
    cycle = name in ("RMSprop", "NAdam")
    sched, twin_sched = (
        optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40, cycle_momentum=cycle)
        for o in (opt, twin_opt)
    )
    stream = hotloop.fit(
        data,
        model,
        opt,
        loss_fn,
        batch_size=16,
        every=5,
        engine="native",
        scheduler=sched,
        generator=torch.Generator().manual_seed(2),
    )
    events = list(itertools.islice(stream, 4))
    stream.close()
    reference = torch.Generator().manual_seed(2)
    n, done, losses = data[0].shape[0], 0, []
    while done < 20:
        for index in torch.randperm(n, generator=reference).split(16):
            loss = loss_fn(twin(data[0][index]), data[1][index])
            twin_opt.zero_grad()
            loss.backward()
            twin_opt.step()
            twin_sched.step()
            losses.append((loss.item(), index.numel()))
            done += 1
            if done == 20:
                break
    windows = [losses[k : k + 5] for k in range(0, 20, 5)]
    expected = [sum(v * c for v, c in w) / sum(c for _, c in w) for w in windows]
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=RTOL)
    assert_same_state(model, twin, rtol=RTOL)
    assert_same_optimizer_state(opt, twin_opt, rtol=RTOL)
    assert sched.state_dict() == twin_sched.state_dict()


# --- LBFGS: the python engine calls step(closure) ------------------------------------------------------


def lbfgs_plain_loop(data, model, opt, loss_fn, *, batch_size, steps, generator):
    losses = []
    n = data[0].shape[0]
    while len(losses) < steps:
        for index in torch.randperm(n, generator=generator).split(batch_size):
            x, y = data[0][index], data[1][index]

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            losses.append(opt.step(closure).item())
            if len(losses) == steps:
                break
    return losses


LBFGS_OPTIONS = {
    "default": {},
    "strong_wolfe": {"line_search_fn": "strong_wolfe", "max_iter": 5, "history_size": 4},
}


@pytest.mark.parametrize("options", LBFGS_OPTIONS.values(), ids=LBFGS_OPTIONS.keys())
@pytest.mark.parametrize("batch_size", [50, 16], ids=["full_batch", "minibatch"])
def test_lbfgs_matches_a_plain_loop(options, batch_size):
    data, model, loss_fn = workload()
    twin = copy.deepcopy(model)
    opt = optim.LBFGS(model.parameters(), lr=0.2, **options)
    twin_opt = optim.LBFGS(twin.parameters(), lr=0.2, **options)
    with pytest.warns(hotloop.SlowPathWarning, match="LBFGS.step requires a closure"):
        stream = hotloop.fit(
            data,
            model,
            opt,
            loss_fn,
            batch_size=batch_size,
            every=1,
            generator=torch.Generator().manual_seed(3),
        )
        events = list(itertools.islice(stream, 6))
    stream.close()
    # the event's train_loss is the loss step() returns: the closure's first evaluation, before the update
    expected = lbfgs_plain_loop(
        data,
        twin,
        twin_opt,
        loss_fn,
        batch_size=batch_size,
        steps=6,
        generator=torch.Generator().manual_seed(3),
    )
    assert [e["engine"] for e in events] == ["python"] * 6
    assert [e["train_loss"] for e in events] == expected
    assert_same_state(model, twin, rtol=0, atol=0)
    assert_identical(opt.state_dict(), twin_opt.state_dict())


def assert_identical(ours, theirs):
    """Equal nested containers of tensors and plain values (LBFGS keeps lists of tensors in its state)."""
    if isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert_identical(ours[key], theirs[key])
    elif isinstance(ours, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert_identical(a, b)
    else:
        assert ours == theirs


def test_lbfgs_on_the_native_engine_raises_why():
    data, model, loss_fn = workload()
    stream = hotloop.fit(data, model, optim.LBFGS(model.parameters()), loss_fn, engine="native")
    with pytest.raises(RuntimeError, match="LBFGS.step requires a closure"):
        next(stream)


def test_lbfgs_train_metric_and_non_finite_loss_from_the_first_evaluation():
    data, model, loss_fn = workload()
    opt = optim.LBFGS(model.parameters(), max_iter=3)
    probe = copy.deepcopy(model)

    def loss_or_nan(pred, y):
        loss = loss_fn(pred, y)
        return loss * float("nan") if opt.state and opt.state[opt._params[0]]["n_iter"] >= 6 else loss

    stream = hotloop.fit(
        data,
        model,
        opt,
        loss_or_nan,
        batch_size=16,
        every=1,
        engine="python",
        on_nonfinite="stop",
        metrics={"train_mae": lambda pred, y: (pred - y).abs().mean()},
        generator=torch.Generator().manual_seed(4),
    )
    weights = [copy.deepcopy(model.state_dict())]
    events = []
    for event in stream:
        events.append(event)
        weights.append(copy.deepcopy(model.state_dict()))
    stopped = events[-1]
    assert stopped["nonfinite_step"] == stopped["updates"] + 1 == len(events)
    assert all(torch.equal(v, weights[-2][k]) for k, v in weights[-1].items())  # its update was not applied
    order = torch.randperm(50, generator=torch.Generator().manual_seed(4)).split(16)
    for event, before, index in zip(events[:-1], weights, order, strict=False):
        # the metric and the loss are the closure's first evaluation: the weights before the step
        probe.load_state_dict(before)
        with torch.no_grad():
            pred = probe(data[0][index])
        assert event["train_mae"] == pytest.approx((pred - data[1][index]).abs().mean().item(), rel=1e-6)
        assert event["train_loss"] == pytest.approx(loss_fn(pred, data[1][index]).item(), rel=1e-6)


class ClosureOnly(optim.SGD):
    def step(self, closure):  # a required closure with a contract hotloop cannot know
        return super().step(closure)


def test_other_closure_optimizers_fail_up_front_naming_them():
    data, model, loss_fn = workload()
    stream = hotloop.fit(data, model, ClosureOnly(model.parameters(), lr=0.1), loss_fn)
    with pytest.raises(
        ValueError, match="ClosureOnly.step requires a closure, and hotloop only calls closures"
    ):
        next(stream)
