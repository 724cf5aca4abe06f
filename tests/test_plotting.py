"""plot_history (PNG files) and live_plot (notebook output, via a recording display handle)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hotloop import LivePlot, collect, live_plot, pipe, plot_history, take

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(n: int = 5) -> list[dict[str, Any]]:
    return [
        {"model": None, "step": i, "train_loss": 1.0 / i, **({"val_loss": 1.5 / i} if i % 2 else {})}
        for i in range(1, n + 1)
    ]


# plot_history -------------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE


def test_plot_history_writes_a_png_from_collected_events(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot_history(collect(history()), ["train_loss", "val_loss"], tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert_png(out)


def test_plot_history_consumes_an_event_stream_and_a_single_key(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    stream = iter(history(100) + [{"step": 101, "train_loss": torch.tensor(0.01)}])
    out = plot_history(stream, "train_loss", str(tmp_path / "loss.png"), logy=True)
    assert_png(out)
    assert list(stream) == []


def test_plot_history_leaves_pyplot_alone(tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    plot_history(history(), ["train_loss"], tmp_path / "a.png")
    assert plt.get_fignums() == before


def test_plot_history_handles_gaps_and_non_finite_values(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    events = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": math.nan},
        {"step": 3},
        {"step": 4, "loss": math.inf},
    ]
    assert_png(plot_history(events, ["loss"], tmp_path / "gaps.png"))


@pytest.mark.parametrize(
    ("events", "keys", "error", "message"),
    [
        ([], ["loss"], ValueError, "history is empty"),
        ([{"step": 1, "loss": 1.0}], ["val"], ValueError, r"keys \['val'\] appear in none of the 1 events"),
        ([{"loss": 1.0}], ["loss"], ValueError, r"history\[0\] has no 'step' key"),
        ([{"step": 1, "loss": 1.0}, 3], ["loss"], TypeError, r"history\[1\] must be an event dict"),
        ([{"step": 1, "loss": 1.0}], [], ValueError, "keys must name at least one event key"),
        ([{"step": 1, "loss": 1.0}], ["loss", "loss"], ValueError, "keys must be unique"),
        ([{"step": 1, "loss": 1.0}], [3], TypeError, "keys must contain nonempty str"),
        ([{"step": 1, "loss": 1.0}], 3, TypeError, "keys must be a str or a sequence of str"),
        ({"step": 1, "loss": 1.0}, ["loss"], TypeError, "history must be an iterable of events"),
    ],
)
def test_plot_history_errors(
    tmp_path: Path, events: Any, keys: Any, error: type[Exception], message: str
) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(error, match=message):
        plot_history(events, keys, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_history_argument_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        plot_history(history(), ["train_loss"], 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="logy must be a bool"):
        plot_history(history(), ["train_loss"], tmp_path / "x.png", logy=1)  # type: ignore[arg-type]


def test_plot_history_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_history(history(), ["train_loss"], tmp_path / "x.png")


# live_plot ----------------------------------------------------------------------------------------------


class RecordingHandle:
    """Stands in for IPython's DisplayHandle: records what would be shown in the notebook output."""

    instances: list[RecordingHandle] = []

    def __init__(self) -> None:
        self.displayed: list[Any] = []
        self.updates: list[list[list[tuple[float, float]]]] = []
        RecordingHandle.instances.append(self)

    def display(self, figure: Any) -> None:
        self.displayed.append(figure)

    def update(self, figure: Any) -> None:
        self.updates.append(
            [[tuple(map(float, xy)) for xy in line.get_xydata()] for line in figure.axes[0].lines]
        )


@pytest.fixture
def notebook(monkeypatch: pytest.MonkeyPatch) -> type[RecordingHandle]:
    display = pytest.importorskip("IPython.display")
    pytest.importorskip("matplotlib")
    RecordingHandle.instances = []
    monkeypatch.setattr(display, "DisplayHandle", RecordingHandle)
    return RecordingHandle


def test_live_plot_draws_every_event_with_zero_interval(notebook: type[RecordingHandle]) -> None:
    events = history(4)
    with live_plot("train_loss", "val_loss", min_interval=0) as plot:
        assert isinstance(plot, LivePlot)
        out = list(pipe(events, plot))
    assert out == events
    (handle,) = notebook.instances
    assert handle.displayed == [plot.ax.figure]
    assert len(handle.updates) == 4 + 1  # one per event, one on exit
    train, val = handle.updates[-1]
    assert train == [(float(i), 1.0 / i) for i in range(1, 5)]
    assert [xy[0] for xy in val] == [1.0, 2.0, 3.0, 4.0]
    assert math.isnan(val[1][1]) and val[2][1] == pytest.approx(0.5)
    assert plot.ax.get_xlabel() == "step"
    assert [t.get_text() for t in plot.ax.get_legend().get_texts()] == ["train_loss", "val_loss"]


def test_live_plot_throttles_redraws_but_keeps_every_point(notebook: type[RecordingHandle]) -> None:
    with live_plot("train_loss", min_interval=3600) as plot:
        for _ in plot(history(10)):
            pass
    (handle,) = notebook.instances
    assert len(handle.updates) == 2  # the first event, then the final redraw on exit
    assert len(handle.updates[-1][0]) == 10


def test_live_plot_is_lazy_and_composes_with_take(notebook: type[RecordingHandle]) -> None:
    pulled = []

    def source():
        for event in history(10):
            pulled.append(event["step"])
            yield event

    with live_plot("train_loss", min_interval=0) as plot:
        assert [e["step"] for e in pipe(source(), plot, take(3))] == [1, 2, 3]
    assert pulled == [1, 2, 3]


def test_live_plot_draws_into_given_axes(notebook: type[RecordingHandle]) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    figure, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="existing")
    try:
        with live_plot("train_loss", ax=ax) as plot:
            list(plot(history(3)))
        assert plot.ax is ax
        assert len(ax.lines) == 2
        assert plt.fignum_exists(figure.number)  # not ours to close
    finally:
        plt.close(figure)


def test_live_plot_closes_its_own_figure(notebook: type[RecordingHandle]) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    with live_plot("train_loss") as plot:
        number = plot.ax.figure.number
        assert plt.fignum_exists(number)
    assert not plt.fignum_exists(number)


def test_live_plot_misuse(notebook: type[RecordingHandle]) -> None:
    plot = live_plot("train_loss")
    with pytest.raises(RuntimeError, match=r"^Use live_plot inside its 'with' context\.$"):
        next(iter(plot(history())))
    with plot:
        stream = plot(history())
        next(stream)
    with pytest.raises(RuntimeError, match=r"^Use live_plot inside its 'with' context\.$"):
        next(stream)
    with pytest.raises(RuntimeError, match=r"^Create a new live_plot context for each run\.$"):
        plot.__enter__()
    with pytest.raises(RuntimeError, match=r"^Use live_plot inside its 'with' context\.$"):
        plot.refresh()


def test_live_plot_rejects_bad_events_without_recording(notebook: type[RecordingHandle]) -> None:
    with live_plot("train_loss", min_interval=0) as plot:
        with pytest.raises(ValueError, match=r"^Event 'step' must be finite\.$"):
            list(plot([{"step": math.inf, "train_loss": 1.0}]))
        with pytest.raises(ValueError):
            list(plot([{"step": 1, "train_loss": "high"}]))
        with pytest.raises(KeyError):
            list(plot([{"train_loss": 1.0}]))
        list(plot([{"step": 5, "train_loss": 2.0}]))
    assert notebook.instances[0].updates[-1] == [[(5.0, 2.0)]]


def test_live_plot_keeps_the_training_error(
    notebook: type[RecordingHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_update(self: RecordingHandle, figure: Any) -> None:
        raise OSError("display gone")

    with pytest.raises(KeyboardInterrupt) as caught:
        with live_plot("train_loss") as plot:
            list(plot(history(2)))
            monkeypatch.setattr(RecordingHandle, "update", broken_update)
            raise KeyboardInterrupt
    if sys.version_info >= (3, 11):
        assert "live_plot final refresh also failed: display gone" in caught.value.__notes__
    monkeypatch.undo()


def test_live_plot_with_the_real_display_outside_a_notebook(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("IPython")
    pytest.importorskip("matplotlib")
    with live_plot("train_loss", min_interval=0) as plot:
        list(plot(history(2)))
    assert "Figure" in capsys.readouterr().out  # IPython prints the repr when no kernel is attached
    assert len(plot.ax.lines[0].get_xdata()) == 2


@pytest.mark.parametrize(
    ("keys", "kwargs", "error", "message"),
    [
        ((), {}, ValueError, r"^Provide at least one nonempty metric key\.$"),
        (("",), {}, ValueError, r"^Provide at least one nonempty metric key\.$"),
        ((3,), {}, ValueError, r"^Provide at least one nonempty metric key\.$"),
        (("a", "a"), {}, ValueError, r"^Metric keys must be unique\.$"),
        (("a",), {"min_interval": -1}, ValueError, r"^min_interval must be finite and nonnegative\.$"),
        (("a",), {"min_interval": math.nan}, ValueError, r"^min_interval must be finite and nonnegative\.$"),
        (("a",), {"min_interval": "1"}, TypeError, "min_interval must be a number"),
    ],
)
def test_live_plot_argument_errors(
    keys: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        live_plot(*keys, **kwargs)


def test_live_plot_without_ipython(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    monkeypatch.setitem(sys.modules, "IPython", None)
    plot = live_plot("train_loss")
    with pytest.raises(ImportError, match=r"pip install 'hotloop\[notebook\]'"):
        plot.__enter__()
