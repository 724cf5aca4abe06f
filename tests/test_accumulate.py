"""fit(accumulate=k): k micro-batches per optimizer step, as the plain loop in fit()'s docstring."""

from __future__ import annotations

import copy
import itertools

import hotloop
import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_state
from torch import nn

ENGINES = ["native", "python"]
N, B = 50, 8  # accumulate=3: steps of 24, 24 and 2 samples per epoch (the last one micro-batch of 2)


def model_and_data(seed=0, dropout=True):
    torch.manual_seed(seed)
    # no bias before BatchNorm: its gradient is rounding noise, which Adam would scale up to full steps
    layers = [nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU()]
    layers += [nn.Dropout(0.2)] if dropout else []
    model = nn.Sequential(*layers, nn.Linear(16, 1))
    return (torch.randn(N, 6), torch.randn(N, 1)), model


def plain_loop(data, model, optimizer, loss_fn, *, k, epochs, generator, drop_last=False, after_step=None):
    """The loop in fit()'s docstring; returns each epoch's sample-weighted mean loss, and the updates."""
    x, y = data
    losses, updates = [], 0
    for _ in range(epochs):
        model.train()
        groups = list(torch.randperm(N, generator=generator).split(B * k))
        if drop_last and len(groups[-1]) < B * k:
            groups.pop()
        total, count = 0.0, 0
        for group in groups:
            optimizer.zero_grad()
            for index in group.split(B):
                loss = loss_fn(model(x[index]), y[index])
                (loss / k).backward()
                total += loss.item() * len(index)
                count += len(index)
            optimizer.step()
            updates += 1
            if after_step is not None:
                after_step()
        losses.append(total / count)
    return losses, updates


def run_both(engine, *, k=3, epochs=3, opt="Adam", drop_last=False, dropout=True, **options):
    data, model = model_and_data(dropout=dropout)
    twin = copy.deepcopy(model)
    make = getattr(torch.optim, opt)
    optimizer, twin_opt = make(model.parameters(), lr=0.01), make(twin.parameters(), lr=0.01)
    torch.manual_seed(5)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=B,
        accumulate=k,
        engine=engine,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    events = list(itertools.islice(stream, epochs))
    stream.close()
    torch.manual_seed(5)
    expected, updates = plain_loop(
        data,
        twin,
        twin_opt,
        nn.MSELoss(),
        k=k,
        epochs=epochs,
        generator=torch.Generator().manual_seed(3),
        drop_last=drop_last,
    )
    return events, expected, updates, (model, optimizer), (twin, twin_opt)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("opt", ["Adam", "SGD"])
def test_accumulation_matches_the_plain_loop(engine, opt):
    # BatchNorm statistics and dropout draws advance micro-batch by micro-batch, as in the plain loop
    events, expected, updates, (model, optimizer), (twin, twin_opt) = run_both(engine, opt=opt)
    assert {e["engine"] for e in events} == {engine}
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-5)
    assert [e["updates"] for e in events] == [3, 6, 9] and updates == 9
    assert [e["epoch"] for e in events] == [1, 2, 3]
    assert_same_state(model, twin)
    assert_same_optimizer_state(optimizer, twin_opt)


@pytest.mark.parametrize("engine", ENGINES)
def test_drop_last_drops_the_incomplete_last_step(engine):
    events, expected, updates, (model, _), (twin, _) = run_both(engine, drop_last=True, opt="SGD")
    assert [e["updates"] for e in events] == [2, 4, 6] and updates == 6
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-5)
    assert_same_state(model, twin)


def test_the_engines_agree_and_accumulate_one_is_the_plain_step():
    native, *_ = run_both("native", k=4, dropout=False)
    python, *_ = run_both("python", k=4, dropout=False)
    assert [e["train_loss"] for e in native] == pytest.approx([e["train_loss"] for e in python], rel=1e-6)
    one, expected, updates, (model, _), (twin, _) = run_both("native", k=1)
    assert [e["updates"] for e in one] == [7, 14, 21] and updates == 21
    assert [e["train_loss"] for e in one] == pytest.approx(expected, rel=1e-5)
    assert_same_state(model, twin)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_counts_optimizer_steps_and_the_scheduler_steps_with_them(engine):
    data, model = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=B,
        accumulate=3,
        every=2,
        engine=engine,
        scheduler=scheduler,
    )
    events = list(itertools.islice(stream, 3))
    stream.close()
    assert [e["updates"] for e in events] == [2, 4, 6]
    assert [e["epoch"] for e in events] == [0, 1, 2]  # 3 optimizer steps per epoch
    assert events[-1]["lr"] == pytest.approx(0.1 * 0.5**6)


@pytest.mark.parametrize("engine", ENGINES)
def test_accumulation_with_clipping_clips_the_summed_gradient(engine):
    def clip():
        nn.utils.clip_grad_norm_(twin.parameters(), 0.1)

    data, model = model_and_data(dropout=False)
    twin = copy.deepcopy(model)
    optimizer, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=B,
        accumulate=2,
        engine=engine,
        clip_grad_norm=0.1,
        generator=torch.Generator().manual_seed(3),
    )
    events = list(itertools.islice(stream, 2))
    stream.close()
    # clip between the last backward and step: the plain loop with clipping before its step
    original_step = twin_opt.step

    def clipped_step(*args, **kwargs):
        clip()
        return original_step(*args, **kwargs)

    twin_opt.step = clipped_step
    expected, _ = plain_loop(
        data, twin, twin_opt, nn.MSELoss(), k=2, epochs=2, generator=torch.Generator().manual_seed(3)
    )
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-5)
    assert_same_state(model, twin)


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_mid_epoch_continues_the_micro_batches(engine):
    def start(resume=None):
        data, model = model_and_data(dropout=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        stream = hotloop.fit(
            data,
            model,
            optimizer,
            nn.MSELoss(),
            batch_size=B,
            accumulate=3,
            every=2,
            engine=engine,
            generator=torch.Generator().manual_seed(3),
            resume=resume,
        )
        return stream, model

    full, model = start()
    events = [next(full)]
    state = full.state_dict()
    events += [next(full) for _ in range(3)]
    full.close()
    resumed, model_b = start(state)
    rest = [next(resumed) for _ in range(3)]
    resumed.close()
    assert [(e["updates"], e["train_loss"]) for e in rest] == [
        (e["updates"], e["train_loss"]) for e in events[1:]
    ]
    assert_same_state(model_b, model, rtol=0, atol=0)
    data, model_c = model_and_data(dropout=False)
    other = hotloop.fit(
        data,
        model_c,
        torch.optim.Adam(model_c.parameters()),
        nn.MSELoss(),
        batch_size=B,
        accumulate=2,
        every=2,
        engine=engine,
        generator=torch.Generator().manual_seed(3),
        resume=state,
    )
    with pytest.raises(ValueError, match="accumulate=3"):
        next(other)


def test_accumulate_is_checked_naming_the_argument():
    data, model = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad, error in ((0, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="accumulate"):
            next(hotloop.fit(data, model, optimizer, nn.MSELoss(), accumulate=bad))
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="accumulate"):
        next(hotloop.fit(data, model, lbfgs, nn.MSELoss(), batch_size=B, accumulate=2))
