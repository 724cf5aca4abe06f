"""fit(clip_grad_norm=..., clip_grad_value=...): parity with torch's clipping in a plain loop, both engines"""

from __future__ import annotations

import copy
import itertools
import math

import hotloop
import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_state, mlp, plain_loop_losses
from hotloop.clipping import GradClip, NormClip, check_clip
from torch import nn

ENGINES = ["native", "python"]


def workload(seed=0):
    torch.manual_seed(seed)
    # 50 = 3 * 16 + 2: the full-batch graph and the last-batch graph both run
    return (torch.randn(50, 6), torch.randn(50, 1) * 10), mlp(6, 8, 1), nn.MSELoss()


def fit_both(engine, *, clip_norm=None, clip_value=None, plain_clip, events=3, opt="Adam"):
    data, model, loss_fn = workload()
    twin = copy.deepcopy(model)
    make = getattr(torch.optim, opt)
    optimizer, twin_opt = make(model.parameters(), lr=0.01), make(twin.parameters(), lr=0.01)
    stream = hotloop.fit(
        data,
        model,
        optimizer,
        loss_fn,
        batch_size=16,
        engine=engine,
        generator=torch.Generator().manual_seed(3),
        clip_grad_norm=clip_norm,
        clip_grad_value=clip_value,
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
        generator=torch.Generator().manual_seed(3),
        after_backward=lambda: plain_clip(twin),
    )
    return got, expected, (model, optimizer), (twin, twin_opt)


NORMS = [
    (0.5, lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.5)),
    ((0.5, 1.0), lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.5, norm_type=1.0)),
    ({"max_norm": 0.2, "norm_type": "inf"}, lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.2, "inf")),
    ((0.3, 3), lambda m: nn.utils.clip_grad_norm_(m.parameters(), 0.3, 3)),
    ((100.0, 2.0, True), lambda m: nn.utils.clip_grad_norm_(m.parameters(), 100.0, error_if_nonfinite=True)),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", range(len(NORMS)))
def test_clip_grad_norm_matches_the_plain_loop(engine, case):
    option, plain = NORMS[case]
    got, expected, (model, opt), (twin, twin_opt) = fit_both(engine, clip_norm=option, plain_clip=plain)
    assert {e["engine"] for e in got} == {engine}
    assert [e["train_loss"] for e in got] == pytest.approx(expected, rel=1e-5)
    assert_same_state(model, twin)
    assert_same_optimizer_state(opt, twin_opt)


@pytest.mark.parametrize("engine", ENGINES)
def test_clip_grad_value_then_norm_matches_the_plain_loop(engine):
    def plain(m):
        nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        nn.utils.clip_grad_value_(m.parameters(), 0.05)

    got, expected, (model, opt), (twin, twin_opt) = fit_both(
        engine, clip_norm=0.5, clip_value=0.05, plain_clip=plain, opt="SGD"
    )
    assert {e["engine"] for e in got} == {engine}
    assert [e["train_loss"] for e in got] == pytest.approx(expected, rel=1e-5)
    assert_same_state(model, twin)


def test_native_clip_is_bitwise_the_python_engines():
    a, _, (model_a, _), _ = fit_both("native", clip_norm=0.5, plain_clip=lambda m: None)
    b, _, (model_b, _), _ = fit_both("python", clip_norm=0.5, plain_clip=lambda m: None)
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(value, model_b.state_dict()[key], rtol=2e-6, atol=1e-7)


class Blowup(nn.Module):
    """From the third call on, a finite loss with a non-finite gradient (sqrt at zero)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        late = self.calls >= 3
        under = self.lin.bias * 0.0 + torch.where(late, 0.0, 1.0)
        return self.lin(x) + torch.where(late, torch.sqrt(under), 0.0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("on_nonfinite", ["raise", "continue"])
def test_error_if_nonfinite_raises_like_torch_without_applying_the_step(engine, on_nonfinite):
    torch.manual_seed(0)
    model = Blowup()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    # the plain loop: torch raises at step 3, before the update
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="non-finite"):
        for i in range(5):
            rows = slice(4 * (i % 2), 4 * (i % 2) + 4)
            loss = nn.functional.mse_loss(twin(x[rows]), y[rows])
            twin_opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(twin.parameters(), 1.0, error_if_nonfinite=True)
            twin_opt.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = hotloop.fit(
        (x, y),
        model,
        opt,
        nn.MSELoss(),
        batch_size=4,
        shuffle=False,
        every=1,
        engine=engine,
        on_nonfinite=on_nonfinite,
        clip_grad_norm={"max_norm": 1.0, "error_if_nonfinite": True},
    )
    events = []
    with pytest.raises(hotloop.NonFiniteGradNormError, match="optimizer step 3") as info:
        for event in stream:
            events.append(event)
    assert isinstance(info.value, RuntimeError)
    assert "error_if_nonfinite=False" in str(info.value)
    assert len(events) == 2
    torch.testing.assert_close(model.lin.weight, twin.lin.weight)
    torch.testing.assert_close(model.lin.bias, twin.lin.bias)


def test_nonfinite_norm_without_error_trains_on_as_torch_does():
    # error_if_nonfinite=False: torch scales by the non-finite norm; both engines do the same
    results = []
    for engine in ENGINES:
        torch.manual_seed(0)
        model = Blowup()
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stream = hotloop.fit(
            (x, y),
            model,
            opt,
            nn.MSELoss(),
            batch_size=4,
            shuffle=False,
            every=2,
            engine=engine,
            on_nonfinite="continue",
            clip_grad_norm=1.0,
        )
        next(stream)
        next(stream)
        stream.close()
        results.append(model.lin.weight.detach().clone())
    assert math.isnan(results[0].sum().item()) and math.isnan(results[1].sum().item())


def test_the_options_are_checked_naming_the_argument():
    assert check_clip(None, None) is None
    assert check_clip(1, None) == GradClip(NormClip(1.0))
    assert check_clip((1, "inf", True), 0.5) == GradClip(NormClip(1.0, math.inf, True), 0.5)
    assert check_clip({"max_norm": 2, "norm_type": 1}, None) == GradClip(NormClip(2.0, 1.0))
    with pytest.raises(TypeError, match="clip_grad_norm"):
        check_clip("big", None)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        check_clip(-1.0, None)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        check_clip({"norm": 2}, None)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        check_clip((1, 2, True, 4), None)
    with pytest.raises(TypeError, match="error_if_nonfinite"):
        check_clip((1, 2, "yes"), None)
    with pytest.raises(ValueError, match="clip_grad_value"):
        check_clip(None, 0)
    with pytest.raises(TypeError, match="clip_grad_value"):
        check_clip(None, "1")
    data, model, loss_fn = workload()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = hotloop.fit(data, model, optimizer, loss_fn, clip_grad_value=-1)
    with pytest.raises(ValueError, match="clip_grad_value"):
        next(stream)


def test_auto_runs_clipping_natively():
    data, model, loss_fn = workload()
    stream = hotloop.fit(
        data, model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, batch_size=16, clip_grad_norm=1.0
    )
    assert next(stream)["engine"] == "native"
    stream.close()
