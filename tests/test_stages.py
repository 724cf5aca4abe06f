"""Stream stages: composition, laziness, per-stage semantics and argument errors."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hotloop import (
    augment,
    early_stop,
    ema,
    fit,
    pipe,
    print_keys,
    progress,
    take,
    tap,
    tick,
    validation_loss,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn


class Counting:
    """An event iterator that counts how many events were pulled from it."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._events = iter(events)
        self.pulled = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        event = next(self._events)
        self.pulled += 1
        return event


def steps(n: int, **fixed: Any) -> list[dict[str, Any]]:
    return [{"step": i, **fixed} for i in range(1, n + 1)]


# pipe ---------------------------------------------------------------------------------------------------


def test_pipe_applies_stages_left_to_right() -> None:
    order: list[str] = []

    def stage(name: str):
        def apply(events):
            for event in events:
                order.append(name)
                yield event

        return apply

    out = list(pipe(steps(1), stage("a"), stage("b")))
    assert out == [{"step": 1}]
    assert order == ["a", "b"]


def test_pipe_without_stages_returns_the_stream() -> None:
    events = steps(2)
    assert pipe(events) is events


def test_pipe_is_lazy() -> None:
    source = Counting(steps(3))
    stream = pipe(source, tap(lambda e: None), augment(lambda e: None))
    assert source.pulled == 0
    next(iter(stream))
    assert source.pulled == 1


def test_pipe_rejects_non_callable_stage_before_applying_any() -> None:
    applied = []
    with pytest.raises(TypeError, match=r"^pipe stages must be callable\.$"):
        pipe(steps(1), lambda s: applied.append(1) or s, 3)
    assert applied == []


def test_pipe_rejects_non_iterable_stream() -> None:
    with pytest.raises(TypeError, match="stream must be an iterable"):
        pipe(5, take(1))


# augment ------------------------------------------------------------------------------------------------


def test_augment_merges_into_a_new_dict() -> None:
    events = steps(2)
    out = list(augment(lambda e: {"double": 2 * e["step"]})(events))
    assert out == [{"step": 1, "double": 2}, {"step": 2, "double": 4}]
    assert events == steps(2)  # inputs untouched


def test_augment_overrides_existing_keys_and_accepts_none_or_empty() -> None:
    out = list(augment(lambda e: {"step": 10} if e["step"] == 1 else None)(steps(2)))
    assert out == [{"step": 10}, {"step": 2}]
    assert list(augment(lambda e: {})(steps(1))) == [{"step": 1}]


def test_augment_rejects_non_dict_results_lazily() -> None:
    stage = augment(lambda e: [("a", 1)])
    stream = stage(steps(1))
    with pytest.raises(TypeError, match=r"^augment function must return a dict or None\.$"):
        next(iter(stream))


def test_augment_requires_callable() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        augment({"a": 1})  # type: ignore[arg-type]


# take ---------------------------------------------------------------------------------------------------


def test_take_never_pulls_beyond_n() -> None:
    source = Counting(steps(10))
    assert [e["step"] for e in take(3)(source)] == [1, 2, 3]
    assert source.pulled == 3
    assert next(source) == {"step": 4}  # the input continues where take left it


def test_take_zero_never_advances_the_input() -> None:
    started = []

    def source():
        started.append(True)
        yield {"step": 1}

    gen = source()
    assert list(take(0)(gen)) == []
    assert started == []
    assert next(gen) == {"step": 1}


def test_take_more_than_available() -> None:
    assert list(take(5)(steps(2))) == steps(2)


@given(st.integers(min_value=0, max_value=20), st.integers(min_value=0, max_value=20))
def test_take_property(n: int, available: int) -> None:
    source = Counting(steps(available))
    assert list(take(n)(source)) == steps(available)[:n]
    assert source.pulled == min(n, available)


def test_take_errors() -> None:
    with pytest.raises(ValueError, match=r"^n must be >= 0\.$"):
        take(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        take(2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n must be an int"):
        take(True)


# tap / tick ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "start", "expected"),
    [(1, 1, [1, 2, 3, 4, 5, 6, 7]), (2, 1, [1, 3, 5, 7]), (3, 2, [2, 5]), (1, 6, [6, 7]), (5, 8, [])],
)
def test_tap_schedule(every: int, start: int, expected: list[int]) -> None:
    seen: list[int] = []
    out = list(tap(lambda e: seen.append(e["step"]), every=every, start=start)(steps(7)))
    assert seen == expected
    assert out == steps(7)


def test_tap_runs_before_the_event_is_yielded_and_ignores_return_value() -> None:
    seen: list[int] = []
    stream = tap(lambda e: seen.append(e["step"]) or "ignored")(steps(3))
    first = next(iter(stream))
    assert first == {"step": 1} and seen == [1]


def test_tap_errors() -> None:
    with pytest.raises(TypeError, match=r"^tap requires a callable\.$"):
        tap(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^every must be >= 1\.$"):
        tap(print, every=0)
    with pytest.raises(ValueError, match=r"^start must be >= 1\.$"):
        tap(print, start=0)
    with pytest.raises(TypeError, match="every must be an int"):
        tap(print, every=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="start must be an int"):
        tap(print, start="1")  # type: ignore[arg-type]


def test_tick_calls_once_per_event() -> None:
    calls: list[int] = []
    source = Counting(steps(4))
    stream = tick(lambda: calls.append(source.pulled))(source)
    assert list(stream) == steps(4)
    assert calls == [1, 2, 3, 4]


def test_tick_errors() -> None:
    with pytest.raises(TypeError, match=r"^tick requires a callable\.$"):
        tick(3)  # type: ignore[arg-type]


# print_keys ---------------------------------------------------------------------------------------------


def test_print_keys_formats(capsys: pytest.CaptureFixture[str]) -> None:
    show = print_keys("loss", "t", "flag", "count", "name", "vec", "missing", precision=2)
    show(
        {
            "step": 3,
            "loss": 0.12345,
            "t": torch.tensor([1.5]),
            "flag": True,
            "count": 7,
            "name": "adam",
            "vec": torch.tensor([1.0, 2.0]),
        }
    )
    line = capsys.readouterr().out
    assert (
        line == "step=0003 loss=0.12 t=1.50 flag=True count=7.00 name=adam vec=tensor([1., 2.]) missing=NA\n"
    )


def test_print_keys_step_handling(capsys: pytest.CaptureFixture[str]) -> None:
    print_keys("a")({"step": "warmup", "a": 1.0})
    print_keys("a", include_step=False)({"step": 1, "a": 1.0})
    print_keys("a", step_key="epoch")({"epoch": 12, "a": 1.0})
    print_keys()({"step": 2})
    print_keys("a")({"a": 1.0})
    assert capsys.readouterr().out.splitlines() == [
        "step=warmup a=1.0000",
        "a=1.0000",
        "epoch=0012 a=1.0000",
        "step=0002",
        "a=1.0000",
    ]


def test_print_keys_errors() -> None:
    with pytest.raises(ValueError, match=r"^precision must be >= 0\.$"):
        print_keys("a", precision=-1)
    with pytest.raises(ValueError, match=r"^Provide at least one key when include_step=False\.$"):
        print_keys(include_step=False)
    with pytest.raises(TypeError, match="keys must be a str"):
        print_keys(["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="precision must be an int"):
        print_keys("a", precision=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include_step must be a bool"):
        print_keys("a", include_step=1)  # type: ignore[arg-type]


# ema ----------------------------------------------------------------------------------------------------


def reference_ema(values: list[float], decay: float, bias_correction: bool) -> list[float]:
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = decay * m + (1 - decay) * x
        out.append(m / (1 - decay**t) if bias_correction else m)
    return out


@given(
    st.lists(st.floats(min_value=-1e3, max_value=1e3), min_size=1, max_size=20),
    st.floats(min_value=0.01, max_value=0.99),
    st.booleans(),
)
def test_ema_matches_reference(values: list[float], decay: float, bias_correction: bool) -> None:
    events = [{"loss": v} for v in values]
    got = [e["loss_ema"] for e in ema("loss", decay=decay, bias_correction=bias_correction)(events)]
    assert got == pytest.approx(reference_ema(values, decay, bias_correction), rel=1e-9, abs=1e-9)


def test_ema_half_life_out_key_and_tensor_values() -> None:
    events = [{"loss": torch.tensor(2.0)}, {"loss": 4}]
    out = list(ema("loss", half_life=2.0, out_key="smooth")(events))
    decay = 2.0 ** (-1 / 2.0)
    assert [e["smooth"] for e in out] == pytest.approx(reference_ema([2.0, 4.0], decay, True))
    assert "loss_ema" not in out[0]
    # an empty out_key falls back to the default name, as in fitstream
    assert "loss_ema" in next(iter(ema("loss", decay=0.5, out_key="")(events)))


def test_ema_missing_key_raises_key_error() -> None:
    with pytest.raises(KeyError):
        list(ema("loss", decay=0.5)([{"loss": 1.0}, {"other": 1.0}]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, r"^Provide exactly one of decay or half_life\.$"),
        ({"decay": 0.5, "half_life": 2.0}, ValueError, r"^Provide exactly one of decay or half_life\.$"),
        ({"half_life": 0.0}, ValueError, r"^half_life must be > 0\.$"),
        ({"half_life": -1}, ValueError, r"^half_life must be > 0\.$"),
        ({"decay": 1.0}, ValueError, r"^decay must be in \(0, 1\)\.$"),
        ({"decay": 0}, ValueError, r"^decay must be in \(0, 1\)\.$"),
        ({"half_life": float("inf")}, ValueError, r"^decay must be in \(0, 1\)\.$"),
        ({"decay": "0.5"}, TypeError, "decay must be a real number"),
        ({"decay": 0.5, "out_key": 3}, TypeError, "out_key must be a str"),
        ({"decay": 0.5, "bias_correction": 1}, TypeError, "bias_correction must be a bool"),
    ],
)
def test_ema_errors(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ema("loss", **kwargs)


# early_stop ---------------------------------------------------------------------------------------------


def run_early_stop(values: list[float], **kwargs: Any) -> tuple[list[float], int]:
    source = Counting([{"m": v} for v in values])
    out = [e["m"] for e in early_stop("m", **kwargs)(source)]
    return out, source.pulled


def test_early_stop_min_mode_yields_the_last_event_and_stops_pulling() -> None:
    out, pulled = run_early_stop([5, 4, 4.5, 4.2, 3, 2], patience=2)
    assert out == [5, 4, 4.5, 4.2]
    assert pulled == 4


def test_early_stop_resets_on_improvement() -> None:
    out, _ = run_early_stop([5, 6, 4, 6, 6, 1], patience=2)
    assert out == [5, 6, 4, 6, 6]


def test_early_stop_max_mode_and_min_delta() -> None:
    assert run_early_stop([0.5, 0.6, 0.65, 0.7], patience=1, mode="max")[0] == [0.5, 0.6, 0.65, 0.7]
    assert run_early_stop([0.5, 0.6, 0.65, 0.7], patience=1, mode="max", min_delta=0.1)[0] == [0.5, 0.6]
    # an equal value is not an improvement
    assert run_early_stop([1.0, 1.0, 1.0], patience=2)[0] == [1.0, 1.0, 1.0]


def test_early_stop_without_stopping_passes_everything() -> None:
    assert run_early_stop([5, 4, 3], patience=1) == ([5, 4, 3], 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((0,), {}, ValueError, r"^patience must be >= 1\.$"),
        ((2,), {"mode": "lower"}, ValueError, r"^mode must be one of \{'min', 'max'\}\.$"),
        ((2,), {"min_delta": -0.1}, ValueError, r"^min_delta must be >= 0\.$"),
        ((2,), {"min_delta": float("nan")}, ValueError, r"^min_delta must be >= 0\.$"),
        ((2.0,), {}, TypeError, "patience must be an int"),
        ((2,), {"min_delta": "0"}, TypeError, "min_delta must be a real number"),
    ],
)
def test_early_stop_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        early_stop("val_loss", *args, **kwargs)
    with pytest.raises(TypeError, match="key must be a str"):
        early_stop(1, 2)  # type: ignore[arg-type]


# progress -----------------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    events = [{"step": 1, "train_loss": 0.5}, {"step": 2, "train_loss": 0.25}]
    assert list(progress(total=2)(events)) == events
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_shows_a_bar_with_postfix_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    events = [
        {"step": 1, "train_loss": 0.5, "acc": torch.tensor(0.75)},
        {"step": 2, "train_loss": 0.25, "acc": torch.tensor(0.875)},
    ]
    out = list(progress(total=2, keys=("train_loss", "acc", "absent"), desc="training")(events))
    assert out == events
    text = terminal.getvalue()
    assert "training" in text and "2/2" in text
    assert "train_loss=0.25" in text and "acc=0.875" in text
    assert "absent" not in text


def test_progress_closes_the_bar_when_the_stream_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    stream = progress()(iter(steps(5)))
    next(stream)
    assert not terminal.getvalue().endswith("\n")
    stream.close()
    assert terminal.getvalue().endswith("\n")  # tqdm finishes a closed bar's line
    assert "1event" in terminal.getvalue()


def test_progress_without_tqdm_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        progress()


def test_progress_errors() -> None:
    pytest.importorskip("tqdm")
    with pytest.raises(TypeError, match="total must be an int"):
        progress(total=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total must be >= 0"):
        progress(total=-1)
    with pytest.raises(TypeError, match="keys must be a sequence of str"):
        progress(keys="train_loss")
    with pytest.raises(TypeError, match="keys must be a str"):
        progress(keys=[1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="desc must be a str"):
        progress(desc=3)  # type: ignore[arg-type]


# the stages on a real training stream -------------------------------------------------------------------


def test_stages_on_a_training_stream(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    events = fit((x, y), model, opt, nn.MSELoss(), batch_size=16, engine="python")
    out = list(
        pipe(
            events,
            augment(validation_loss((x[:16], y[:16]), nn.MSELoss())),
            ema("val_loss", decay=0.5),
            tap(print_keys("train_loss", "val_loss"), every=2),
            early_stop("val_loss", patience=3),
            take(4),
        )
    )
    assert [e["step"] for e in out] == [1, 2, 3, 4]
    assert all({"val_loss", "val_loss_ema", "train_loss"} <= e.keys() for e in out)
    assert model.training
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["step=0001", "step=0003"]
    events.close()
