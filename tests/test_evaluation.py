"""evaluate / validation_loss (full batch and batched) and best_model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hotloop.evaluation as evaluation
import pytest
import torch
from hotloop import SlowPathWarning, augment, best_model, evaluate, fit, pipe, take, tap, validation_loss
from hotloop.evaluation import BestModel
from hotloop.metrics import accuracy
from torch import nn


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def class_data(n: int = 103, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def event_for(model: nn.Module) -> dict[str, Any]:
    return {"step": 1, "model": model}


# accuracy -----------------------------------------------------------------------------------------------


def test_accuracy_multiclass_and_binary() -> None:
    pred = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.2, 0.1], [0.0, 0.1, 0.3], [0.5, 0.4, 0.1]])
    assert accuracy(pred, torch.tensor([1, 0, 2, 1])).item() == pytest.approx(0.75)
    logits = torch.tensor([[1.5], [-0.5], [0.2], [-2.0]])
    assert accuracy(logits, torch.tensor([[1.0], [0.0], [0.0], [1.0]])).item() == pytest.approx(0.5)
    assert accuracy(logits.reshape(-1), torch.tensor([True, False, True, False])).item() == 1.0
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])).item() == 1.0
    # sequence outputs: argmax over the last dimension, mean over every position
    seq = torch.zeros(2, 3, 4)
    seq[..., 2] = 1.0
    assert accuracy(seq, torch.tensor([[2, 2, 0], [2, 1, 2]])).item() == pytest.approx(4 / 6)


def test_accuracy_shape_errors() -> None:
    with pytest.raises(ValueError, match="do not match predictions"):
        accuracy(torch.zeros(4, 3), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="3 labels for 4 single-output predictions"):
        accuracy(torch.zeros(4, 1), torch.zeros(3))


# evaluate, full batch -----------------------------------------------------------------------------------


def test_evaluate_full_batch_matches_a_manual_forward() -> None:
    model = classifier()
    x, y = class_data()
    got = evaluate((x, y), metrics={"val_loss": nn.CrossEntropyLoss(), "val_acc": "accuracy"})(
        event_for(model)
    )
    model.eval()
    with torch.no_grad():
        pred = model(x)
    model.train()
    assert got == {
        "val_loss": nn.functional.cross_entropy(pred, y).item(),
        "val_acc": (pred.argmax(-1) == y).double().mean().item(),
    }
    assert all(isinstance(v, float) for v in got.values())


def test_evaluate_metrics_see_one_shared_forward_without_grad() -> None:
    model = classifier()
    x, y = class_data()
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    seen: list[torch.Tensor] = []

    def capture(pred: torch.Tensor, labels: torch.Tensor) -> float:
        assert not torch.is_grad_enabled()
        seen.append(pred)
        return 1.0

    result = evaluate((x, y), metrics={"a": capture, "b": capture})(event_for(model))
    assert result == {"a": 1.0, "b": 1.0}
    assert calls == [103]
    assert seen[0] is seen[1]


def test_evaluate_without_labels_and_multiple_inputs() -> None:
    class Pair(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * b

    a, b = torch.arange(6.0), torch.full((6,), 2.0)
    metric = evaluate((a, b), metrics={"mean": lambda pred: pred.mean()}, last_label=False)
    assert metric(event_for(Pair())) == {"mean": 5.0}
    batched = evaluate((a, b), metrics={"mean": lambda pred: pred.mean()}, last_label=False, batch_size=4)
    assert batched(event_for(Pair())) == {"mean": 5.0}


@pytest.mark.filterwarnings("ignore::hotloop.SlowPathWarning")  # metrics that return floats run in Python
def test_evaluate_restores_each_module_mode_even_on_error() -> None:
    model = classifier()
    model.train()
    model[1].eval()  # a mixed-mode model: BatchNorm frozen, the rest training
    x, y = class_data()
    modes = [m.training for m in model.modules()]

    def check_eval(pred: torch.Tensor, labels: torch.Tensor) -> float:
        assert not any(m.training for m in model.modules())
        return 0.0

    evaluate((x, y), metrics={"m": check_eval}, batch_size=10)(event_for(model))
    assert [m.training for m in model.modules()] == modes

    def boom(pred: torch.Tensor, labels: torch.Tensor) -> float:
        raise RuntimeError("metric failed")

    for batch_size in (None, 7):
        with pytest.raises(RuntimeError, match="metric failed"):
            evaluate((x, y), metrics={"m": boom}, batch_size=batch_size)(event_for(model))
        assert [m.training for m in model.modules()] == modes


def test_evaluate_does_not_change_batchnorm_statistics() -> None:
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = class_data()
    evaluate((x, y), metrics={"acc": "accuracy"}, batch_size=8)(event_for(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_evaluate_needs_a_model_in_the_event() -> None:
    metric = evaluate(class_data(), metrics={"acc": "accuracy"})
    with pytest.raises(TypeError, match=r"^evaluate expects an event containing a 'model' key"):
        metric({"model": "not a module"})
    with pytest.raises(KeyError):
        metric({"step": 1})


# evaluate, batched --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 10, 32, 102, 103, 500])
def test_batched_equals_full_batch(batch_size: int) -> None:
    model = classifier()
    x, y = class_data(103)  # 103 = 3 * 32 + 7: a partial last batch for most sizes
    metrics = {"val_loss": nn.CrossEntropyLoss(), "val_acc": "accuracy"}
    full = evaluate((x, y), metrics=metrics)(event_for(model))
    batched = evaluate((x, y), metrics=metrics, batch_size=batch_size)(event_for(model))
    assert batched.keys() == full.keys()
    assert batched["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    assert batched["val_acc"] == pytest.approx(full["val_acc"], abs=1e-6)


def test_batched_binary_accuracy_and_validation_loss() -> None:
    torch.manual_seed(3)
    model = nn.Linear(4, 1)
    x = torch.randn(50, 4)
    y = (torch.rand(50, 1) > 0.5).float()
    loss = nn.BCEWithLogitsLoss()
    for batch_size in (None, 16):
        got = evaluate((x, y), metrics={"acc": "accuracy"}, batch_size=batch_size)(event_for(model))
        with torch.no_grad():
            expected = ((model(x) > 0).float() == y).float().mean().item()
        assert got["acc"] == pytest.approx(expected, abs=1e-6)
    full = validation_loss((x, y), loss)(event_for(model))["val_loss"]
    batched = validation_loss((x, y), loss, batch_size=16, key="vl")(event_for(model))["vl"]
    assert batched == pytest.approx(full, abs=1e-6)


def test_batched_accepts_python_numbers_and_calls_each_metric_per_batch() -> None:
    model = nn.Identity()
    x = torch.arange(10.0).reshape(10, 1)
    calls: list[int] = []

    def mean_as_float(pred: torch.Tensor, labels: torch.Tensor) -> float:
        calls.append(pred.shape[0])
        return float(pred.mean())

    with pytest.warns(SlowPathWarning, match="metric 'm' reads tensor values in Python"):
        got = evaluate((x, x), metrics={"m": mean_as_float}, batch_size=4)(event_for(model))
    assert got == {"m": pytest.approx(4.5)}
    assert calls == [4, 4, 4, 2]  # the failed native capture, then the Python batches


def test_python_batched_syncs_once_per_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[Any] = []
    real = evaluation._as_float
    monkeypatch.setattr(evaluation, "_as_float", lambda value: syncs.append(value) or real(value))
    x, y = class_data(100)
    model = classifier().eval()
    evaluation.evaluate_batched(model, [x], y, {"a": accuracy, "l": nn.CrossEntropyLoss()}, batch_size=7)
    assert len(syncs) == 2
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in syncs)


def test_batched_rejects_non_scalar_metric_values() -> None:
    x, y = class_data(20)
    metric = evaluate((x, y), metrics={"per_sample": lambda p, t: p.sum(-1)}, batch_size=5)
    with pytest.raises(ValueError, match="metric 'per_sample' must return a single-element tensor"):
        metric(event_for(classifier()))


def test_evaluate_batched_is_a_replaceable_function() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [2.0], [5.0]])
    assert evaluation.evaluate_batched(model, [x], y, {"mse": nn.MSELoss()}, 2) == {
        "mse": pytest.approx(4 / 3)
    }


# argument errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("val_data", "kwargs", "error", "message"),
    [
        ((), {}, ValueError, r"^val_data must contain at least one tensor\.$"),
        ((torch.zeros(3),), {}, ValueError, r"^last_label=True requires at least two tensors"),
        (
            torch.zeros(3, 2),
            {},
            TypeError,
            "val_data must be a tuple or list of tensors, got a single Tensor",
        ),
        ("xy", {}, TypeError, "val_data must be a tuple or list of tensors"),
        ((torch.zeros(3), [1, 2, 3]), {}, TypeError, r"val_data\[1\] must be a torch.Tensor"),
        (class_data(), {"metrics": {}}, ValueError, r"^metrics must contain at least one metric\.$"),
        (class_data(), {"metrics": "accuracy"}, TypeError, "metrics must be a mapping"),
        (class_data(), {"metrics": 3}, TypeError, "metrics must be a mapping"),
        (class_data(), {"metrics": {1: "accuracy"}}, TypeError, "metrics keys must be str"),
        (
            class_data(),
            {"metrics": {"a": "f1"}},
            ValueError,
            "unknown metric name 'f1'; known names: 'accuracy'",
        ),
        (class_data(), {"metrics": {"a": 3}}, TypeError, r"metrics\['a'\] must be callable or a metric name"),
        (class_data(), {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        (class_data(), {"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        (class_data(), {"last_label": 1}, TypeError, "last_label must be a bool"),
        (class_data(), {"metrics": {"a": "accuracy"}, "last_label": False}, ValueError, "needs labels"),
        ((torch.zeros(3), torch.zeros(4)), {"batch_size": 2}, ValueError, "same number of samples"),
    ],
)
def test_evaluate_errors(val_data: Any, kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    kwargs = {"metrics": {"acc": "accuracy"}, **kwargs}
    with pytest.raises(error, match=message):
        evaluate(val_data, **kwargs)


def test_validation_loss_errors() -> None:
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        validation_loss(class_data(), "mse")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key must be a str"):
        validation_loss(class_data(), nn.MSELoss(), key=1)  # type: ignore[arg-type]


def test_metric_pairs_are_accepted_like_dict() -> None:
    metric = evaluate(class_data(), metrics=[("acc", "accuracy")])  # type: ignore[arg-type]
    assert set(metric(event_for(classifier()))) == {"acc"}


# best_model ---------------------------------------------------------------------------------------------


def linear_with(value: float) -> nn.Module:
    model = nn.Linear(2, 1)
    nn.init.constant_(model.weight, value)
    nn.init.constant_(model.bias, value)
    return model


def feed(best: BestModel, model: nn.Module, values: list[float]) -> None:
    for i, value in enumerate(values):
        nn.init.constant_(model.weight, value)
        nn.init.constant_(model.bias, float(i))
        best({"model": model, "m": value})


@pytest.mark.parametrize(
    ("direction", "values", "expected_weight", "expected_bias"),
    [("min", [3.0, 1.0, 2.0, 1.0], 1.0, 1.0), ("max", [3.0, 1.0, 4.0, 4.0], 4.0, 2.0)],
)
def test_best_model_keeps_the_first_strictly_best(
    direction: str, values: list[float], expected_weight: float, expected_bias: float
) -> None:
    model = linear_with(0.0)
    best = best_model("m", direction=direction)  # type: ignore[arg-type]
    feed(best, model, values)
    target = linear_with(-1.0)
    target.eval()
    best.load_into(target)
    assert torch.all(target.weight == expected_weight) and target.bias.item() == expected_bias
    assert not target.training  # mode untouched
    assert best.best == (min(values) if direction == "min" else max(values))


def test_best_model_snapshot_is_independent_of_later_training() -> None:
    model = linear_with(1.0)
    best = best_model("m", device="cpu")
    best({"model": model, "m": torch.tensor(0.5)})
    with torch.no_grad():
        model.weight.add_(10.0)
    fresh = linear_with(0.0)
    best.load_into(fresh)
    assert torch.all(fresh.weight == 1.0)
    best.load_into(fresh)  # loading twice works
    assert torch.all(fresh.weight == 1.0)


def test_best_model_saves_each_improvement_to_path(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "best.pt"
    path.parent.mkdir()
    model = linear_with(0.0)
    best = best_model("m", path=path)
    best({"model": model, "m": 2.0})
    assert torch.load(path)["weight"].eq(0.0).all()
    nn.init.constant_(model.weight, 5.0)
    best({"model": model, "m": 1.0})
    nn.init.constant_(model.weight, 7.0)
    best({"model": model, "m": 3.0})  # no improvement: file unchanged
    saved = torch.load(path)
    assert saved.keys() == model.state_dict().keys()
    assert torch.all(saved["weight"] == 5.0)
    reloaded = linear_with(0.0)
    reloaded.load_state_dict(saved)
    expected = linear_with(0.0)
    best.load_into(expected)
    ours, theirs = reloaded.state_dict(), expected.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_best_model_in_a_training_pipeline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    best = best_model("val_loss", path=tmp_path / "best.pt")
    stream = fit((x, y), model, opt, nn.MSELoss(), batch_size=16, engine="python")
    seen = [
        e["val_loss"]
        for e in pipe(
            stream, augment(validation_loss((x, y), nn.MSELoss(), batch_size=20)), tap(best), take(5)
        )
    ]
    stream.close()
    assert best.best == min(seen)
    restored = nn.Linear(3, 1)
    restored.load_state_dict(torch.load(tmp_path / "best.pt"))
    assert validation_loss((x, y), nn.MSELoss())(event_for(restored))["val_loss"] == pytest.approx(min(seen))


def test_best_model_errors() -> None:
    with pytest.raises(ValueError, match=r"^direction must be one of \{'min', 'max'\}\.$"):
        best_model("m", direction="lower")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metric_key must be a str"):
        best_model(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="device must be"):
        best_model("m", device=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid torch device"):
        best_model("m", device="gpu0")
    with pytest.raises(TypeError, match="path must be"):
        best_model("m", path=1)  # type: ignore[arg-type]
    best = best_model("m")
    with pytest.raises(RuntimeError, match=r"^No model state has been captured yet\.$"):
        best.load_into(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"^Metric 'm' must be finite\.$"):
        best({"model": nn.Linear(1, 1), "m": float("nan")})
    with pytest.raises(KeyError):
        best({"model": nn.Linear(1, 1)})
    best({"model": nn.Linear(2, 1), "m": 1.0})
    with pytest.raises(RuntimeError, match="size mismatch"):
        best.load_into(nn.Linear(3, 1))
