"""The aot engine: parity with the plain loop (SGD, Adam, AdamW), lr changes, schedulers, resume, metrics,
gradient clipping and accumulation, the non-finite guard, the package cache, auto's background compile and
switch, and the fallbacks.

AOTInductor reorders float operations, so the runs match the plain loop to rounding: 1e-5 relative on
weights and optimizer state after three epochs. Compiles are slow (about 10-30 s each), so the whole module
shares one package cache and compiles three packages for most tests: one per optimizer configuration below,
all for the same model, batch size and metric (the other tests reuse them); clipping and accumulation
compile one more each.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_state, mlp, plain_loop_losses
from hotloop import SlowPathWarning, aot_compile, fit
from hotloop.fit import NonFiniteLossError
from test_accumulate import run_both as accumulated_runs
from torch import nn

RTOL = 1e-5
BATCH = 32


def mae(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (pred - labels).abs().mean()


METRICS = {"mae": mae}
SGD_OPTIONS = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
ADAM_OPTIONS = {"lr": 1e-2}
ADAMW_OPTIONS = {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}
CONFIGS = {
    "sgd": (torch.optim.SGD, SGD_OPTIONS),
    "adam": (torch.optim.Adam, ADAM_OPTIONS),
    "adamw": (torch.optim.AdamW, ADAMW_OPTIONS),
}


@pytest.fixture(scope="module")
def aot_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("aot-packages")


@pytest.fixture(autouse=True)
def _cache(aot_cache, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOTLOOP_CACHE_DIR", str(aot_cache))
    monkeypatch.setenv("HOTLOOP_AOT_AFTER", "never")


def data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=g)


def setup(kind: str, seed: int = 1):
    torch.manual_seed(seed)
    model = mlp()
    reference = copy.deepcopy(model)
    optimizer_class, options = CONFIGS[kind]
    return (
        model,
        optimizer_class(model.parameters(), **options),
        reference,
        optimizer_class(reference.parameters(), **options),
    )


def run(stream, events: int) -> list:
    out = [next(stream) for _ in range(events)]
    stream.close()
    return out


def assert_same_optimizer_state_scaled(optimizer, reference) -> None:
    """Optimizer state within RTOL of each tensor's largest value (momentum and moment estimates pass
    through zero, where an elementwise relative tolerance measures nothing but rounding), Adam's first
    moment on the scale of the gradients it averages."""
    ours, theirs = optimizer.state_dict(), reference.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, state in ours["state"].items():
        assert state.keys() == theirs["state"][index].keys()
        for name, value in state.items():
            other = theirs["state"][index][name]
            scale = other.abs().max().item()
            if name == "exp_avg":
                # a mean of gradients can decay towards zero while the gradients' rounding does not: its
                # scale is the gradients' own, sqrt(exp_avg_sq)
                scale = max(scale, theirs["state"][index]["exp_avg_sq"].sqrt().max().item())
            torch.testing.assert_close(value, other, rtol=0, atol=RTOL * scale + 1e-12, msg=f"{index} {name}")


def assert_close_losses(ours: list[float], theirs: list[float]) -> None:
    torch.testing.assert_close(
        torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), rtol=RTOL, atol=0
    )


def test_auto_compiles_in_the_background_and_switches_with_parity(monkeypatch: pytest.MonkeyPatch):
    # Compiles the AdamW package in a child process while the run trains natively, then switches to it at a
    # window boundary; the whole run, before and after the switch, matches the plain loop.
    monkeypatch.setenv("HOTLOOP_AOT_AFTER", "0")
    x, y = data()
    model, optimizer, reference, ref_optimizer = setup("adamw")
    stream = fit(
        (x, y),
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        engine="auto",
        every=3,
        generator=torch.Generator().manual_seed(5),
    )
    events, deadline = [next(stream)], time.monotonic() + 900  # a hang guard, not a timing check
    while events[-1]["engine"] != "aot":
        assert time.monotonic() < deadline, "the background compile never finished"
        time.sleep(0.05)  # leave the child process the CPU; the run trains on at the next event
        events.append(next(stream))
    events += [next(stream) for _ in range(4)]
    stream.close()
    engines = [e["engine"] for e in events]
    assert engines[0] == "native" and engines[-1] == "aot"
    assert engines == sorted(engines, key=lambda e: e == "aot")  # once switched, it stays switched
    losses = plain_loop_losses(
        (x, y),
        reference,
        ref_optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        steps=3 * len(events),
        every=3,
        generator=torch.Generator().manual_seed(5),
    )
    assert_close_losses([e["train_loss"] for e in events], losses)
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, ref_optimizer)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_aot_matches_the_plain_loop(kind: str):
    # 192 samples: six full batches, so the last step of each epoch (and the .grad it leaves) is the
    # package's; with 200 the smaller last batch runs natively (test_partial_last_batch_runs_natively).
    x, y = data(192)
    model, optimizer, reference, ref_optimizer = setup(kind)
    events = run(
        fit(
            (x, y),
            model,
            optimizer,
            nn.MSELoss(),
            batch_size=BATCH,
            engine="aot",
            metrics=METRICS,
            generator=torch.Generator().manual_seed(3),
        ),
        3,
    )
    assert [e["engine"] for e in events] == ["aot"] * 3
    losses = plain_loop_losses(
        (x, y),
        reference,
        ref_optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        steps=18,
        generator=torch.Generator().manual_seed(3),
    )
    assert_close_losses([e["train_loss"] for e in events], losses)
    assert [e["updates"] for e in events] == [6, 12, 18]
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, ref_optimizer)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert all(0 < e["mae"] < 10 for e in events)


def test_partial_last_batch_runs_natively_and_metrics_match():
    x, y = data(200)  # 6 batches of 32 and one of 8 per epoch
    model, optimizer, reference, ref_optimizer = setup("adam")
    events = run(
        fit(
            (x, y),
            model,
            optimizer,
            nn.MSELoss(),
            batch_size=BATCH,
            engine="aot",
            metrics=METRICS,
            generator=torch.Generator().manual_seed(3),
        ),
        3,
    )
    native = copy.deepcopy(reference)
    native_optimizer = torch.optim.Adam(native.parameters(), **ADAM_OPTIONS)
    expected = run(
        fit(
            (x, y),
            native,
            native_optimizer,
            nn.MSELoss(),
            batch_size=BATCH,
            engine="native",
            metrics=METRICS,
            generator=torch.Generator().manual_seed(3),
        ),
        3,
    )
    for ours, theirs in zip(events, expected, strict=True):
        assert ours["engine"] == "aot" and ours["updates"] == theirs["updates"]
        for key in ("train_loss", "mae"):
            assert ours[key] == pytest.approx(theirs[key], rel=RTOL)
    assert_same_state(model, native, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, native_optimizer)


def test_second_run_uses_the_cached_package():
    x, y = data()
    for _ in range(2):
        model, optimizer, _, _ = setup("adam")
        before = aot_compile.COMPILES
        run(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, engine="aot", metrics=METRICS), 1)
    assert aot_compile.COMPILES == before  # the second run compiled nothing


def test_auto_uses_a_cached_package_at_once():
    x, y = data()
    model, optimizer, _, _ = setup("adam")
    run(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, engine="aot", metrics=METRICS), 1)
    before = aot_compile.COMPILES
    model, optimizer, _, _ = setup("adam")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        events = run(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, metrics=METRICS), 2)
    assert [e["engine"] for e in events] == ["aot", "aot"]
    assert aot_compile.COMPILES == before


def test_lr_change_and_per_step_scheduler_match_the_plain_loop():
    x, y = data()
    model, optimizer, reference, ref_optimizer = setup("adam")
    # OneCycleLR moves lr and Adam's beta1 every step
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=40)
    ref_scheduler = torch.optim.lr_scheduler.OneCycleLR(ref_optimizer, max_lr=0.05, total_steps=40)
    stream = fit(
        (x, y),
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        engine="aot",
        metrics=METRICS,
        scheduler=scheduler,
        every=5,
        shuffle=False,
    )
    events = [next(stream) for _ in range(3)]
    for group in optimizer.param_groups:
        group["lr"] *= 0.5  # between events, as a user may
    events.append(next(stream))
    stream.close()
    n, done, losses = x.shape[0], 0, []
    chunks = [slice(i, i + BATCH) for i in range(0, n, BATCH)]
    window = []
    while done < 20:
        for index in chunks:
            if done == 15:
                for group in ref_optimizer.param_groups:
                    group["lr"] *= 0.5
            loss = nn.MSELoss()(reference(x[index]), y[index])
            ref_optimizer.zero_grad()
            loss.backward()
            ref_optimizer.step()
            ref_scheduler.step()
            window.append((loss.item(), x[index].shape[0]))
            done += 1
            if done % 5 == 0:
                losses.append(sum(v * c for v, c in window) / sum(c for _, c in window))
                window = []
            if done == 20:
                break
    assert [e["engine"] for e in events] == ["aot"] * 4
    assert_close_losses([e["train_loss"] for e in events], losses)
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, ref_optimizer)


def test_resume_continues_exactly():
    x, y = data()
    model, optimizer, _, _ = setup("adam")
    stream = fit(
        (x, y),
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        engine="aot",
        metrics=METRICS,
        generator=torch.Generator().manual_seed(7),
    )
    next(stream)
    state = copy.deepcopy(stream.state_dict())
    straight = [next(stream)["train_loss"] for _ in range(2)]
    stream.close()
    resumed_model, resumed_optimizer, _, _ = setup("adam", seed=99)  # other weights: resume loads them
    resumed = fit(
        (x, y),
        resumed_model,
        resumed_optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        engine="aot",
        metrics=METRICS,
        generator=torch.Generator(),
        resume=state,
    )
    events = run(resumed, 2)
    assert [e["train_loss"] for e in events] == straight  # the same package on the same inputs: bitwise
    assert_same_state(resumed_model, model, rtol=0, atol=0)
    assert_same_optimizer_state(resumed_optimizer, optimizer, rtol=0, atol=0)


@pytest.mark.parametrize("on_nonfinite", ["raise", "stop"])
def test_nonfinite_step_is_not_applied(on_nonfinite: str):
    x, y = data()
    x[100, 3] = float("nan")  # in the fourth batch without shuffling
    model, optimizer, reference, ref_optimizer = setup("adam")
    stream = fit(
        (x, y),
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        engine="aot",
        metrics=METRICS,
        shuffle=False,
        on_nonfinite=on_nonfinite,
    )
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteLossError, match="step 4"):
            next(stream)
    else:
        event = next(stream)
        assert event["nonfinite_step"] == 4 and event["updates"] == 3
    plain_loop_losses(
        (x, y), reference, ref_optimizer, nn.MSELoss(), batch_size=BATCH, steps=3, shuffle=False
    )
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, ref_optimizer)


def test_no_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("HOTLOOP_CACHE_DIR", str(tmp_path))  # nothing cached
    monkeypatch.setattr(aot_compile, "compiler_missing", lambda: "no C++ compiler was found (simulated)")
    x, y = data()
    model, optimizer, _, _ = setup("sgd")
    with pytest.raises(
        RuntimeError, match=r"engine='aot' cannot run.*no C\+\+ compiler was found \(simulated\)"
    ):
        next(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, engine="aot"))
    monkeypatch.setenv("HOTLOOP_AOT_AFTER", "0")
    model, optimizer, reference, ref_optimizer = setup("sgd")
    with pytest.warns(SlowPathWarning, match=r"keeps the native engine.*simulated"):
        events = run(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, shuffle=False), 2)
    assert [e["engine"] for e in events] == ["native", "native"]
    plain_loop_losses(
        (x, y), reference, ref_optimizer, nn.MSELoss(), batch_size=BATCH, steps=14, shuffle=False
    )
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)


def test_background_compile_failure_keeps_native(monkeypatch: pytest.MonkeyPatch, tmp_path):
    # the child process's compiler is missing: its compile fails at once, the run warns and stays native
    monkeypatch.setenv("HOTLOOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HOTLOOP_AOT_AFTER", "0")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    x, y = data()
    model, optimizer, reference, ref_optimizer = setup("sgd")
    stream = fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, every=7, shuffle=False)
    events, deadline = [], time.monotonic() + 600  # a hang guard, not a timing check
    with pytest.warns(
        SlowPathWarning, match="keeps the native engine.*AOTInductor failed to compile"
    ) as record:
        while not any(issubclass(w.category, SlowPathWarning) for w in record):
            assert time.monotonic() < deadline, "the background compile never ended"
            time.sleep(0.05)
            events.append(next(stream))
    stream.close()
    assert {e["engine"] for e in events} == {"native"}
    plain_loop_losses(
        (x, y), reference, ref_optimizer, nn.MSELoss(), batch_size=BATCH, steps=7 * len(events), shuffle=False
    )
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)
    assert not list(tmp_path.rglob("*.pt2"))


def test_compile_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("HOTLOOP_CACHE_DIR", str(tmp_path))

    def broken(exported, path):
        raise RuntimeError("simulated compiler crash")

    monkeypatch.setattr(aot_compile, "compile_exported", broken)
    x, y = data()
    model, optimizer, _, _ = setup("sgd")
    with pytest.raises(
        RuntimeError, match="AOTInductor failed to compile the step.*simulated compiler crash"
    ):
        next(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH, engine="aot"))
    assert not list(tmp_path.rglob("*.pt2"))


def test_refusals_name_the_cause():
    x, y = data()
    torch.manual_seed(0)
    model = mlp()
    with pytest.raises(RuntimeError, match="RMSprop has no compiled update"):
        next(fit((x, y), model, torch.optim.RMSprop(model.parameters()), nn.MSELoss(), engine="aot"))
    dropout = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    with pytest.raises(RuntimeError, match="draws random numbers"):
        next(fit((x, y), dropout, torch.optim.SGD(dropout.parameters(), lr=0.1), nn.MSELoss(), engine="aot"))
    # under auto these simply run natively, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        event = next(fit((x, y), model, torch.optim.RMSprop(model.parameters()), nn.MSELoss()))
    assert event["engine"] == "native"


def test_auto_keeps_convolutions_native(monkeypatch: pytest.MonkeyPatch):
    # a rule: the compiled CPU step of a CNN ran slower than the native one, so auto never compiles it
    monkeypatch.setenv("HOTLOOP_AOT_AFTER", "0")
    monkeypatch.setattr(aot_compile, "compiler_missing", lambda: "no C++ compiler was found (simulated)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(28, 1))
    x, y = torch.randn(64, 1, 16), torch.randn(64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)  # the would-be compile is never tried
        events = run(
            fit((x, y), model, torch.optim.Adam(model.parameters()), nn.MSELoss(), batch_size=BATCH), 2
        )
    assert [e["engine"] for e in events] == ["native", "native"]
    assert "Conv1d" in (aot_compile.slower_compiled(model) or "")


def test_bad_compile_rule_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOTLOOP_AOT_AFTER", "soon")
    x, y = data()
    model, optimizer, _, _ = setup("sgd")
    with pytest.raises(ValueError, match="HOTLOOP_AOT_AFTER"):
        next(fit((x, y), model, optimizer, nn.MSELoss(), batch_size=BATCH))


FORWARD_CALLS: list[str] = []  # outside the model: hotloop puts its Python state back after a capture attempt


class Branchy(nn.Module):
    """Data-dependent control flow: no engine but python can run it; logs its forward calls."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 1)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARD_CALLS.append(self.name)
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_auto_captures_once_when_the_native_capture_fails():
    x, y = data()
    plain = Branchy("plain")
    next(
        fit(
            (x, y),
            plain,
            torch.optim.SGD(plain.parameters(), lr=0.1),
            nn.MSELoss(),
            batch_size=BATCH,
            engine="python",
        )
    )
    model = Branchy("auto")
    with pytest.warns(SlowPathWarning) as record:
        event = next(
            fit((x, y), model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), batch_size=BATCH)
        )
    assert event["engine"] == "python"
    # one capture attempt (its trace stops at the branch), not one per engine that tried
    assert FORWARD_CALLS.count("auto") == FORWARD_CALLS.count("plain") + 1
    (message,) = [str(w.message) for w in record if issubclass(w.category, SlowPathWarning)]
    assert message.count("engine cannot run") == 1 and "native engine" in message and "aot" not in message


def test_gradient_clipping_matches_the_plain_loop():
    # the package clips inside the step, as the native graph does, before the update
    x, y = data(192)
    model, optimizer, reference, ref_optimizer = setup("sgd")
    events = run(
        fit(
            (x, y),
            model,
            optimizer,
            nn.MSELoss(),
            batch_size=BATCH,
            engine="aot",
            clip_grad_norm=0.05,
            generator=torch.Generator().manual_seed(3),
        ),
        2,
    )
    assert [e["engine"] for e in events] == ["aot"] * 2
    losses = plain_loop_losses(
        (x, y),
        reference,
        ref_optimizer,
        nn.MSELoss(),
        batch_size=BATCH,
        steps=12,
        generator=torch.Generator().manual_seed(3),
        after_backward=lambda: nn.utils.clip_grad_norm_(reference.parameters(), 0.05),
    )
    assert_close_losses([e["train_loss"] for e in events], losses)
    assert_same_state(model, reference, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, ref_optimizer)
    unclipped = fit(
        (x, y), *setup("sgd")[:2], nn.MSELoss(), batch_size=BATCH, generator=torch.Generator().manual_seed(3)
    )
    assert next(unclipped)["train_loss"] != pytest.approx(events[0]["train_loss"], rel=1e-3)  # clipping bit
    unclipped.close()


def test_gradient_accumulation_matches_the_plain_loop():
    # accumulate=3: the package sums three micro-batches (BatchNorm statistics advancing per micro-batch),
    # the epoch's last step of one short micro-batch runs natively
    events, expected, updates, (model, optimizer), (twin, twin_optimizer) = accumulated_runs(
        "aot", opt="Adam", dropout=False
    )
    assert [e["engine"] for e in events] == ["aot"] * 3
    assert_close_losses([e["train_loss"] for e in events], expected)
    assert [e["updates"] for e in events] == [3, 6, 9] and updates == 9
    assert_same_state(model, twin, rtol=RTOL, atol=1e-6)
    assert_same_optimizer_state_scaled(optimizer, twin_optimizer)
