"""The same pipelines through fitstream 0.4.1 and hotloop: same signatures, outputs and errors.

Skipped when fitstream 0.4.1 is not installed (``pip install fitstream==0.4.1 --no-deps``).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hotloop
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

fitstream = pytest.importorskip("fitstream")
if fitstream.__version__ != "0.4.1":
    pytest.skip(
        f"parity is pinned to fitstream 0.4.1, found {fitstream.__version__}", allow_module_level=True
    )

TOOLKIT = [
    "pipe",
    "augment",
    "take",
    "tap",
    "tick",
    "print_keys",
    "ema",
    "early_stop",
    "collect",
    "collect_jsonl",
    "collect_pd",
    "evaluate",
    "validation_loss",
    "best_model",
    "BestModel",
    "live_plot",
    "LivePlot",
]

# keyword arguments hotloop adds; each has a default that behaves like fitstream
ADDED = {
    "evaluate": {"batch_size"},
    "validation_loss": {"batch_size"},
    "best_model": {"path"},
    "BestModel": {"path"},
}


def test_every_fitstream_name_is_in_hotloop() -> None:
    public = {
        name
        for name in dir(fitstream)
        if not name.startswith("_") and not inspect.ismodule(getattr(fitstream, name))
    }
    assert {"epoch_stream", "iter_batches", "Event", *TOOLKIT} <= public
    missing = sorted(name for name in public if not hasattr(hotloop, name))
    assert missing == []


@pytest.mark.parametrize("name", TOOLKIT)
def test_signatures_match(name: str) -> None:
    theirs = inspect.signature(getattr(fitstream, name))
    ours = inspect.signature(getattr(hotloop, name))
    extra = [p for p in ours.parameters.values() if p.name not in theirs.parameters]
    assert {p.name for p in extra} == ADDED.get(name, set())
    assert all(p.default is None for p in extra)
    shared = [p for p in ours.parameters.values() if p.name in theirs.parameters]
    assert [p.name for p in shared] == list(theirs.parameters)
    for param in shared:
        other = theirs.parameters[param.name]
        assert (param.kind, param.default) == (other.kind, other.default), param.name


# outputs ------------------------------------------------------------------------------------------------


def both(build: Callable[[Any], Any]) -> tuple[Any, Any]:
    return build(fitstream), build(hotloop)


values = st.lists(
    st.floats(min_value=-100, max_value=100, allow_nan=False) | st.integers(-100, 100),
    min_size=0,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(
    values,
    st.floats(min_value=0.05, max_value=0.95),
    st.booleans(),
    st.integers(1, 4),
    st.sampled_from(["min", "max"]),
    st.sampled_from([0.0, 0.5, 3.0]),
    st.integers(0, 30),
)
def test_stage_pipelines_match(
    xs: list[float], decay: float, bias: bool, patience: int, mode: str, min_delta: float, n: int
) -> None:
    events = [{"step": i, "m": x} for i, x in enumerate(xs, start=1)]

    def build(lib: Any) -> tuple[list[dict[str, Any]], list[int], list[int]]:
        tapped: list[int] = []
        ticked: list[int] = []
        out = lib.pipe(
            iter(copy.deepcopy(events)),
            lib.augment(lambda e: {"double": 2 * e["m"]}),
            lib.augment(lambda e: {"third": True} if e["step"] % 3 == 0 else None),
            lib.ema("m", decay=decay, bias_correction=bias),
            lib.ema("double", half_life=1 / decay, out_key="d_smooth"),
            lib.tap(lambda e: tapped.append(e["step"]), every=2, start=2),
            lib.tick(lambda: ticked.append(len(ticked))),
            lib.early_stop("m", patience, mode=mode, min_delta=min_delta),
            lib.take(n),
        )
        return list(out), tapped, ticked

    theirs, ours = both(build)
    assert ours == theirs


@pytest.mark.parametrize("n", [0, 1, 3, 10])
def test_take_pulls_the_same_number_of_events(n: int) -> None:
    def build(lib: Any) -> tuple[list[dict[str, Any]], int]:
        pulled = []

        def source():
            for i in range(5):
                pulled.append(i)
                yield {"step": i}

        out = list(lib.take(n)(source()))
        return out, len(pulled)

    theirs, ours = both(build)
    assert ours == theirs
    assert ours[1] == min(n, 5)


def test_early_stop_pulls_the_same_number_of_events() -> None:
    def build(lib: Any) -> int:
        pulled = []

        def source():
            for x in [3, 2, 2, 2, 2, 1, 0]:
                pulled.append(x)
                yield {"m": x}

        list(lib.early_stop("m", 2)(source()))
        return len(pulled)

    theirs, ours = both(build)
    assert ours == theirs == 4


PRINTED = [
    {"step": 3, "a": 0.123456, "b": torch.tensor(2.5), "c": True, "d": 7, "e": "text", "f": torch.ones(2)},
    {"step": "warm", "a": -1e-9, "b": torch.tensor([1.0]), "c": False, "d": None},
    {"a": float("nan"), "b": float("inf")},
    {"step": 2.7, "epoch": 4},
]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"precision": 0}, {"precision": 6}, {"include_step": False}, {"step_key": "epoch"}],
)
def test_print_keys_prints_the_same(kwargs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    def build(lib: Any) -> str:
        show = lib.print_keys("a", "b", "c", "d", "e", "f", "missing", **kwargs)
        for event in PRINTED:
            show(event)
        return capsys.readouterr().out

    theirs, ours = both(build)
    assert ours == theirs


SINK_EVENTS = [
    {"model": nn.Linear(1, 1), "step": 1, "train_loss": 0.5, "lr": 0.1},
    {"model": nn.Linear(1, 1), "step": 2, "train_loss": 0.25, "val_loss": 0.4},
]


@pytest.mark.parametrize(
    "kwargs", [{}, {"include": ["val_loss", "step", "model", "nope"]}, {"exclude": ["lr", "model"]}]
)
def test_sinks_match(kwargs: dict[str, Any], tmp_path: Path) -> None:
    def build(lib: Any) -> tuple[Any, ...]:
        buffer = io.StringIO()
        lib.collect_jsonl(iter(SINK_EVENTS), buffer, **kwargs)
        path = tmp_path / f"{lib.__name__}.jsonl"
        lib.collect_jsonl(SINK_EVENTS, path, **kwargs)
        frame = lib.collect_pd(SINK_EVENTS, **kwargs)
        return (
            lib.collect(iter(SINK_EVENTS), **kwargs),
            buffer.getvalue(),
            path.read_text(),
            frame.to_dict("list"),
        )

    theirs, ours = both(build)
    assert ours[:3] == theirs[:3]
    assert str(ours[3]) == str(theirs[3])  # NaN-safe comparison of the frames


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3))
    return model, torch.randn(40, 4), torch.randint(0, 3, (40,))


def test_evaluate_and_validation_loss_match() -> None:
    def build(lib: Any) -> tuple[Any, ...]:
        model, x, y = model_and_data()
        model[2].eval()
        metrics = {
            "val_loss": nn.CrossEntropyLoss(),
            "acc": lambda p, t: (p.argmax(-1) == t).float().mean(),
            "n": lambda p, t: p.shape[0],
        }
        event = {"model": model, "step": 1}
        out = list(lib.pipe([event], lib.augment(lib.evaluate((x, y), metrics=metrics))))
        loss = lib.validation_loss((x, y), nn.CrossEntropyLoss(), key="vl")(event)
        no_labels = lib.evaluate((x,), metrics={"mean": lambda p: p.mean()}, last_label=False)(event)
        return (
            out[0]["val_loss"],
            out[0]["acc"],
            out[0]["n"],
            loss,
            no_labels,
            [m.training for m in model.modules()],
        )

    theirs, ours = both(build)
    assert ours == theirs


def test_best_model_matches() -> None:
    def build(lib: Any) -> tuple[Any, ...]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        best = lib.best_model("m", direction="max", device="cpu")
        for value in [0.1, 0.5, 0.5, 0.3]:
            with torch.no_grad():
                model[0].weight.add_(1.0)
            best({"model": model, "m": torch.tensor(value)})
        target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        best.load_into(target)
        return {k: v.tolist() for k, v in target.state_dict().items()}

    theirs, ours = both(build)
    assert ours == theirs


# training streams ---------------------------------------------------------------------------------------


def test_training_pipeline_matches() -> None:
    def build(lib: Any) -> list[dict[str, Any]]:
        torch.manual_seed(0)
        x, y = torch.randn(96, 4), torch.randn(96, 1)
        xv, yv = torch.randn(32, 4), torch.randn(32, 1)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        kwargs = {"engine": "python"} if lib is hotloop else {}
        stream = lib.epoch_stream(
            (x, y),
            model,
            opt,
            nn.MSELoss(),
            batch_size=16,
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        best = lib.best_model("val_loss")
        events = lib.pipe(
            stream,
            lib.augment(lib.validation_loss((xv, yv), nn.MSELoss())),
            lib.ema("val_loss", half_life=2),
            lib.tap(best),
            lib.early_stop("val_loss", patience=3),
            lib.take(12),
        )
        out = lib.collect(events, exclude=["train_time_sec"])
        final = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        best.load_into(final)
        out.append({k: v.tolist() for k, v in final.state_dict().items()})
        return out

    theirs, ours = both(build)
    assert len(ours) == len(theirs) > 2
    for mine, other in zip(ours[:-1], theirs[:-1], strict=True):
        assert other.keys() <= mine.keys()
        assert mine["step"] == other["step"]
        for key in ("train_loss", "val_loss", "val_loss_ema"):
            assert mine[key] == pytest.approx(other[key], rel=1e-5, abs=1e-7), key
    for key, value in theirs[-1].items():
        torch.testing.assert_close(torch.tensor(ours[-1][key]), torch.tensor(value), rtol=1e-5, atol=1e-6)


# live_plot ----------------------------------------------------------------------------------------------


class RecordingHandle:
    def __init__(self) -> None:
        self.updates: list[Any] = []

    def display(self, figure: Any) -> None:
        pass

    def update(self, figure: Any) -> None:
        self.updates.append([line.get_xydata().tolist() for line in figure.axes[0].lines])


def test_live_plot_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    display = pytest.importorskip("IPython.display")
    pytest.importorskip("matplotlib")
    handles: list[RecordingHandle] = []
    monkeypatch.setattr(display, "DisplayHandle", lambda: handles.append(RecordingHandle()) or handles[-1])
    events = [
        {"step": 1, "a": 1.0},
        {"step": 2, "a": float("nan"), "b": 2},
        {"step": 3, "b": torch.tensor(1.5)},
    ]

    def build(lib: Any) -> tuple[Any, ...]:
        with lib.live_plot("a", "b", min_interval=0) as plot:
            out = list(lib.pipe(events, plot))
        return out, [str(update) for update in handles[-1].updates], plot.ax.get_xlabel()

    theirs, ours = both(build)
    assert ours == theirs


# errors -------------------------------------------------------------------------------------------------


def _raise_lazily(stage: Any, events: list[dict[str, Any]]) -> None:
    list(stage(events))


ERRORS: dict[str, Callable[[Any], Any]] = {
    "pipe non-callable": lambda lib: lib.pipe([], lib.take(1), "stage"),
    "augment non-dict": lambda lib: _raise_lazily(lib.augment(lambda e: 3), [{}]),
    "take negative": lambda lib: lib.take(-1),
    "tap non-callable": lambda lib: lib.tap(3),
    "tap every": lambda lib: lib.tap(print, every=0),
    "tap start": lambda lib: lib.tap(print, start=0),
    "tick non-callable": lambda lib: lib.tick(None),
    "print_keys precision": lambda lib: lib.print_keys("a", precision=-1),
    "print_keys nothing": lambda lib: lib.print_keys(include_step=False),
    "ema neither": lambda lib: lib.ema("a"),
    "ema both": lambda lib: lib.ema("a", decay=0.5, half_life=1),
    "ema half_life": lambda lib: lib.ema("a", half_life=-2),
    "ema decay": lambda lib: lib.ema("a", decay=1.5),
    "ema half_life inf": lambda lib: lib.ema("a", half_life=math.inf),
    "ema missing key": lambda lib: _raise_lazily(lib.ema("a", decay=0.5), [{"b": 1}]),
    "ema bad value": lambda lib: _raise_lazily(lib.ema("a", decay=0.5), [{"a": "x"}]),
    "early_stop patience": lambda lib: lib.early_stop("a", 0),
    "early_stop mode": lambda lib: lib.early_stop("a", 1, mode="best"),
    "early_stop min_delta": lambda lib: lib.early_stop("a", 1, min_delta=-1.0),
    "early_stop missing key": lambda lib: _raise_lazily(lib.early_stop("a", 1), [{"b": 1}]),
    "collect both": lambda lib: lib.collect([{"a": 1}], include=["a"], exclude=["b"]),
    "collect_pd both": lambda lib: lib.collect_pd([{"a": 1}], include=["a"], exclude=["b"]),
    "collect_jsonl both": lambda lib: lib.collect_jsonl(
        [{"a": 1}], io.StringIO(), include=["a"], exclude=["b"]
    ),
    "collect_jsonl tensor": lambda lib: lib.collect_jsonl([{"a": torch.ones(1)}], io.StringIO()),
    "evaluate empty": lambda lib: lib.evaluate((), metrics={"a": len}),
    "evaluate one tensor": lambda lib: lib.evaluate((torch.ones(2),), metrics={"a": len}),
    "evaluate no metrics": lambda lib: lib.evaluate((torch.ones(2), torch.ones(2)), metrics={}),
    "evaluate not a model": lambda lib: lib.evaluate((torch.ones(2, 1), torch.ones(2)), metrics={"a": len})(
        {"model": 3}
    ),
    "evaluate no model": lambda lib: lib.evaluate((torch.ones(2, 1), torch.ones(2)), metrics={"a": len})({}),
    "validation_loss empty": lambda lib: lib.validation_loss([], nn.MSELoss()),
    "best_model direction": lambda lib: lib.best_model("m", direction="up"),
    "BestModel direction": lambda lib: lib.BestModel("m", "up", None),
    "best_model not finite": lambda lib: lib.best_model("m")({"model": nn.Linear(1, 1), "m": math.inf}),
    "best_model missing key": lambda lib: lib.best_model("m")({"model": nn.Linear(1, 1)}),
    "best_model nothing yet": lambda lib: lib.best_model("m").load_into(nn.Linear(1, 1)),
    "best_model wrong shape": lambda lib: _load_mismatched(lib),
    "live_plot no keys": lambda lib: lib.live_plot(),
    "live_plot empty key": lambda lib: lib.live_plot("a", ""),
    "live_plot duplicate": lambda lib: lib.live_plot("a", "a"),
    "live_plot interval": lambda lib: lib.live_plot("a", min_interval=-1),
    "live_plot interval nan": lambda lib: lib.live_plot("a", min_interval=math.nan),
    "live_plot outside with": lambda lib: lib.live_plot("a").refresh(),
    "live_plot stream outside with": lambda lib: next(iter(lib.live_plot("a")([{"step": 1}]))),
}


def _load_mismatched(lib: Any) -> None:
    best = lib.best_model("m")
    best({"model": nn.Linear(2, 1), "m": 1.0})
    best.load_into(nn.Linear(3, 1))


def outcome(fn: Callable[[Any], Any], lib: Any) -> tuple[str, str]:
    try:
        fn(lib)
    except Exception as error:  # noqa: BLE001 - any error is the outcome being compared
        return type(error).__name__, str(error)
    return "no error", ""


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_match(case: str) -> None:
    theirs = outcome(ERRORS[case], fitstream)
    ours = outcome(ERRORS[case], hotloop)
    assert theirs[0] != "no error"
    assert ours == theirs


def test_live_plot_import_errors_name_each_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    messages = {}
    for lib in (fitstream, hotloop):
        with pytest.raises(ImportError) as caught:
            lib.live_plot("a").__enter__()
        messages[lib.__name__] = str(caught.value)
    assert messages["fitstream"].replace("fitstream[", "hotloop[") == messages["hotloop"]


def test_where_hotloop_checks_earlier() -> None:
    """Documented differences: hotloop rejects these when the stage is built, fitstream only when iterated
    (or never). The error type is the same where fitstream raises one."""
    assert outcome(lambda lib: lib.collect([], include=["a"], exclude=["b"]), fitstream) == ("no error", "")
    assert outcome(lambda lib: lib.collect([], include=["a"], exclude=["b"]), hotloop)[0] == "ValueError"
    assert outcome(lambda lib: lib.take(2.5), hotloop)[0] == "TypeError"
    assert outcome(lambda lib: list(lib.take(2.5)([{}])), fitstream)[0] == "ValueError"
