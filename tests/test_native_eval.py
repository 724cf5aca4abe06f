"""Native batched evaluation (hotloop.native_eval, _C.Evaluator): parity with full-batch evaluation, capture
reuse and fallback."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import hotloop.evaluation as evaluation
import pytest
import torch
from hotloop import SlowPathWarning, augment, evaluate, fit, pipe, take, validation_loss
from hotloop._native import _C
from hotloop.metrics import accuracy
from hotloop.native_eval import batch_sizes, capture_eval
from torch import nn


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def class_data(n: int = 103, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def event_for(model: nn.Module) -> dict[str, Any]:
    return {"step": 1, "model": model}


_FORWARD_CALLS: list[int] = []  # a global: a variable the forward closed over would make capture refuse


@contextmanager
def counting_forwards(model: nn.Module, calls: list[int]) -> Iterator[None]:
    """Record in ``calls`` the batch size of every call of ``model``'s forward (a hook, or a counter held by
    the model or closed over, would be Python state that makes capture refuse)."""
    original = type(model).forward

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        _FORWARD_CALLS.append(x.shape[0])
        return original(self, x)

    _FORWARD_CALLS.clear()
    with mock.patch.object(type(model), "forward", forward):
        try:
            yield
        finally:
            calls.extend(_FORWARD_CALLS)
            _FORWARD_CALLS.clear()


def mean_confidence(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A custom traceable metric: the mean probability given to the true class."""
    return pred.softmax(-1).gather(1, labels[:, None]).mean()


@pytest.fixture
def native_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on any Python batch loop or slow-path warning: evaluation must run natively."""

    def python_loop(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("evaluated in Python, batch by batch")

    monkeypatch.setattr(evaluation, "evaluate_batched", python_loop)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        yield


def full_batch(
    val_data: tuple[torch.Tensor, ...], metrics: dict[str, Any], model: nn.Module, **kw: Any
) -> Any:
    return evaluate(val_data, metrics=metrics, **kw)(event_for(model))


# parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 10, 32, 102, 103, 500])
def test_native_equals_full_batch(native_only: None, batch_size: int) -> None:
    model = classifier()
    x, y = class_data(103)  # a partial last batch for most sizes
    metrics = {
        "loss_module": nn.CrossEntropyLoss(),
        "loss_function": nn.functional.cross_entropy,
        "acc": "accuracy",
        "confidence": mean_confidence,
    }
    expected = full_batch((x, y), metrics, model)
    stage = evaluate((x, y), metrics=metrics, batch_size=batch_size)
    for _ in range(2):  # captured once, then reused
        got = stage(event_for(model))
        assert got.keys() == expected.keys()
        assert all(isinstance(v, float) for v in got.values())
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_batchnorm_and_dropout_run_in_eval_mode(native_only: None) -> None:
    model = classifier()
    x, y = class_data(103)
    for _ in range(3):  # give BatchNorm running statistics that differ from its initial ones
        model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = validation_loss((x, y), nn.CrossEntropyLoss(), batch_size=16)
    first, second = stage(event_for(model)), stage(event_for(model))
    assert first == second  # deterministic: dropout off
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    expected = full_batch((x, y), {"val_loss": nn.CrossEntropyLoss()}, model)
    assert first["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-6)


def test_multiple_inputs_and_integer_inputs(native_only: None) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.linear = nn.Linear(4 + 3, 2)

        def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return self.linear(torch.cat([self.embed(tokens).mean(1), features], dim=1))

    torch.manual_seed(0)
    model = TwoInputs()
    tokens, features = torch.randint(0, 10, (45, 6)), torch.randn(45, 3)
    labels = torch.randint(0, 2, (45,))
    metrics = {"loss": nn.CrossEntropyLoss(), "acc": "accuracy"}
    expected = full_batch((tokens, features, labels), metrics, model)
    got = evaluate((tokens, features, labels), metrics=metrics, batch_size=8)(event_for(model))
    assert got == pytest.approx(expected, abs=1e-6)


def test_without_labels(native_only: None) -> None:
    class Pair(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * b

    a, b = torch.randn(23, 2), torch.randn(23, 2)
    metrics = {"mean": lambda pred: pred.mean(), "square": lambda pred: pred.square().mean()}
    expected = full_batch((a, b), metrics, Pair(), last_label=False)
    got = evaluate((a, b), metrics=metrics, last_label=False, batch_size=5)(event_for(Pair()))
    assert got == pytest.approx(expected, abs=1e-6)


def test_metric_with_a_tensor_constant_and_binary_accuracy(native_only: None) -> None:
    torch.manual_seed(3)
    model = nn.Linear(4, 1)
    x, y = torch.randn(50, 4), (torch.rand(50, 1) > 0.5).float()
    weight = torch.tensor([2.0])
    metrics = {"acc": "accuracy", "weighted": lambda pred, labels: ((pred - labels).abs() * weight).mean()}
    expected = full_batch((x, y), metrics, model)
    got = evaluate((x, y), metrics=metrics, batch_size=16)(event_for(model))
    assert got == pytest.approx(expected, abs=1e-6)


def test_float64_model(native_only: None) -> None:
    model = classifier().double()
    x, y = class_data(40)
    expected = full_batch((x.double(), y), {"loss": nn.CrossEntropyLoss()}, model)
    got = validation_loss((x.double(), y), nn.CrossEntropyLoss(), key="loss", batch_size=12)(event_for(model))
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-12)


# no Python per batch ------------------------------------------------------------------------------------


def test_forward_and_metrics_run_only_at_capture(native_only: None) -> None:
    model = classifier()
    x, y = class_data(103)
    forwards: list[int] = []
    metric_calls: list[int] = []

    def counted(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        metric_calls.append(pred.shape[0])
        return mean_confidence(pred, labels)

    stage = evaluate((x, y), metrics={"c": counted}, batch_size=10)
    with counting_forwards(model, forwards):
        stage(event_for(model))
    # per batch size (10 and the last 3): one trace and one eager check, never one call per batch
    assert sorted(forwards) == sorted(metric_calls) == [3, 3, 10, 10]
    with counting_forwards(model, forwards):
        for _ in range(3):
            stage(event_for(model))
    assert len(forwards) == len(metric_calls) == 4


def test_each_module_mode_is_restored(native_only: None) -> None:
    model = classifier()
    model[1].eval()  # mixed modes
    modes = [m.training for m in model.modules()]
    x, y = class_data()
    evaluate((x, y), metrics={"acc": "accuracy"}, batch_size=10)(event_for(model))
    assert [m.training for m in model.modules()] == modes


def test_follows_trained_weights_in_a_fit_stream(native_only: None) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = fit((x, y), model, opt, nn.MSELoss(), batch_size=16, engine="native")
    seen = []
    for event in pipe(stream, augment(validation_loss((x, y), nn.MSELoss(), batch_size=20)), take(4)):
        full = validation_loss((x, y), nn.MSELoss())(event)["val_loss"]
        seen.append(event["val_loss"])
        assert event["val_loss"] == pytest.approx(full, abs=1e-6)
    stream.close()
    assert len(set(seen)) == 4


# capture reuse ------------------------------------------------------------------------------------------


def test_replaced_tensors_are_rebound_and_changed_models_captured_again(native_only: None) -> None:
    model = classifier()
    x, y = class_data(50)
    metrics = {"loss": nn.CrossEntropyLoss(), "acc": "accuracy"}
    stage = evaluate((x, y), metrics=metrics, batch_size=16)

    def forwards_in_stage(current: nn.Module) -> int:
        """Runs the stage, checks its values and returns how many forwards it ran (captures run some)."""
        forwards: list[int] = []
        with counting_forwards(current, forwards):
            got = stage(event_for(current))
        assert got == pytest.approx(full_batch((x, y), metrics, current), abs=1e-6)
        return len(forwards)

    assert forwards_in_stage(model) > 0
    # same layouts, new tensor objects: rebound, not captured again
    model.load_state_dict(classifier(seed=5).state_dict(), assign=True)
    assert forwards_in_stage(model) == 0
    model[4] = nn.Linear(16, 3)
    assert forwards_in_stage(model) == 0
    # another module type, another parameter shape, another model: captured again
    model[2] = nn.Tanh()
    assert forwards_in_stage(model) > 0
    model[4] = nn.Linear(16, 5)
    assert forwards_in_stage(model) > 0
    assert forwards_in_stage(classifier(seed=7)) > 0


# fallback -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        (
            lambda pred, labels: (pred.argmax(-1) == labels).float().mean().item(),
            "reads tensor values in Python",
        ),
        (lambda pred, labels: 0.25, "returns a float, not a tensor"),
        (
            lambda pred, labels: pred.mean() if pred[0, 0] > 0 else -pred.mean(),
            "data-dependent control flow",
        ),
    ],
)
def test_untraceable_metrics_fall_back_with_one_warning(metric: Any, reason: str) -> None:
    model = classifier()
    x, y = class_data(103)
    stage = evaluate((x, y), metrics={"m": metric, "acc": "accuracy"}, batch_size=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [stage(event_for(model)) for _ in range(3)]
    slow = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1
    assert "'m'" in str(slow[0].message) and reason in str(slow[0].message)
    model.eval()
    expected = evaluation.evaluate_batched(model, [x], y, {"m": metric, "acc": accuracy}, 10)
    assert all(result == pytest.approx(expected, abs=1e-6) for result in results)


def test_untraceable_forward_falls_back() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.linear(x)
            return out if out.sum() > 0 else -out

    model = Branchy()
    x, y = class_data(30)
    with pytest.warns(SlowPathWarning, match="the model's forward .*data-dependent"):
        got = evaluate((x, y), metrics={"acc": "accuracy"}, batch_size=7)(event_for(model))
    model.eval()
    assert got == pytest.approx(evaluation.evaluate_batched(model, [x], y, {"acc": accuracy}, 7))


def test_metric_with_several_values_per_batch_is_an_error() -> None:
    x, y = class_data(20)
    stage = evaluate((x, y), metrics={"per_sample": lambda p, t: p.sum(-1)}, batch_size=5)
    with pytest.raises(ValueError, match="metric 'per_sample' must return a single-element tensor"):
        stage(event_for(classifier()))


# the C++ evaluator ------------------------------------------------------------------------------------


def test_capture_and_evaluator_directly() -> None:
    model = classifier().eval()
    x, y = class_data(103)
    metrics = {"loss": nn.CrossEntropyLoss()}
    captured = capture_eval(model, metrics, [x, y], last_label=True, batch_size=32)
    assert sorted(captured.graphs) == batch_sizes(103, 32)[::-1] == [7, 32]
    assert captured.names == [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    evaluator = _C.Evaluator(sorted(captured.graphs.items()), captured.tensors, [x, y], 32)
    assert (evaluator.num_samples, evaluator.batch_size, evaluator.num_metrics) == (103, 32, 1)
    (loss,) = evaluator.run()
    assert evaluator.batches_run == 4
    with torch.no_grad():
        assert loss == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), abs=1e-6)
    with pytest.raises(RuntimeError, match="no graph was captured for batches of 7 samples"):
        _C.Evaluator([(32, captured.graphs[32])], captured.tensors, [x, y], 32)
    with pytest.raises(RuntimeError, match="has 102 samples"):
        _C.Evaluator(sorted(captured.graphs.items()), captured.tensors, [x, y[:-1]], 32)
    with pytest.raises(RuntimeError, match="takes .* inputs"):
        _C.Evaluator(sorted(captured.graphs.items()), captured.tensors[:-1], [x, y], 32)


def test_ctrl_c_stops_a_long_pass_promptly() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    model = nn.Linear(2, 2).eval()
    x, y = torch.randn(400_000, 2), torch.randint(0, 2, (400_000,))  # batches of 1: seconds per pass
    captured = capture_eval(model, {"acc": accuracy}, [x, y], last_label=True, batch_size=1)
    evaluator = _C.Evaluator(sorted(captured.graphs.items()), captured.tensors, [x, y], 1)
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            evaluator.run()
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 1.0
    assert 0 < evaluator.batches_run < 400_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_native_equals_full_batch_on_cuda(native_only: None) -> None:
    model = classifier().cuda()
    x, y = (t.cuda() for t in class_data(103))
    metrics = {"loss": nn.CrossEntropyLoss(), "acc": "accuracy", "confidence": mean_confidence}
    expected = full_batch((x, y), metrics, model)
    got = evaluate((x, y), metrics=metrics, batch_size=32)(event_for(model))
    assert got == pytest.approx(expected, abs=1e-5)
