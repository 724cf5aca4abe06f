"""Plots of metric curves against ``step``: live in a notebook (``live_plot``) or saved as a PNG."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from math import isfinite, nan
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class LivePlot:
    """The notebook plotting stage returned by :func:`live_plot`; enter it once with ``with``."""

    def __init__(self, keys: tuple[str, ...], *, ax: Axes | None = None, min_interval: float = 1.0) -> None:
        if not keys or any(not isinstance(key, str) or not key for key in keys):
            raise ValueError("Provide at least one nonempty metric key.")
        if len(set(keys)) != len(keys):
            raise ValueError("Metric keys must be unique.")
        if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)):
            raise TypeError(f"min_interval must be a number of seconds, got {type(min_interval).__name__}")
        if not isfinite(min_interval) or min_interval < 0:
            raise ValueError("min_interval must be finite and nonnegative.")
        self._keys = keys
        self._given_ax = ax
        self._own_figure: Figure | None = None
        self._min_interval = float(min_interval)
        self._last_refresh: float | None = None
        self._steps: list[float] = []
        self._values: dict[str, list[float]] = {key: [] for key in keys}
        self._entered = False
        self._active = False

    def __enter__(self) -> LivePlot:
        if self._entered:
            raise RuntimeError("Create a new live_plot context for each run.")
        try:
            import matplotlib.pyplot as plt
            from IPython.display import DisplayHandle
        except ImportError as error:
            raise ImportError(
                "live_plot requires Matplotlib and IPython. Install with: pip install 'hotloop[notebook]'"
            ) from error
        self._entered = True
        with ExitStack() as undo:
            if self._given_ax is None:
                with plt.ioff():
                    self._own_figure, self.ax = plt.subplots()
                undo.callback(plt.close, self._own_figure)
                self.ax.set_xlabel("step")
            else:
                self.ax = self._given_ax
            self._lines = {key: self.ax.plot([], [], label=key)[0] for key in self._keys}
            if self._given_ax is None:
                self.ax.legend()
            self._display = DisplayHandle()
            self._display.display(self.ax.figure)
            undo.pop_all()
        self._active = True
        return self

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("Use live_plot inside its 'with' context.")

    def __call__(self, events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Record each event's step and metrics, redraw when due, and pass the event on unchanged."""
        self._require_active()
        for event in events:
            self._record(event)
            yield event
            self._require_active()

    def _record(self, event: dict[str, Any]) -> None:
        self._require_active()
        step = float(event["step"])
        if not isfinite(step):
            raise ValueError("Event 'step' must be finite.")
        # convert everything before storing anything, so a bad event leaves no partial point
        values = {key: float(event.get(key, nan)) for key in self._keys}
        self._steps.append(step)
        for key, value in values.items():
            self._values[key].append(value if isfinite(value) else nan)
        due = self._last_refresh is None or monotonic() - self._last_refresh >= self._min_interval
        if due or len(self._steps) == 1:
            self.refresh()

    def refresh(self) -> None:
        """Redraw every recorded point now and restart the ``min_interval`` clock."""
        self._require_active()
        for key, line in self._lines.items():
            line.set_data(self._steps, self._values[key])
        self.ax.relim()
        self.ax.autoscale_view()
        self._display.update(self.ax.figure)
        self._last_refresh = monotonic()

    def __exit__(self, exc_type: object, exc_value: BaseException | None, traceback: object) -> None:
        import matplotlib.pyplot as plt

        try:
            self.refresh()
        except Exception as error:
            if exc_value is None:
                raise
            if hasattr(exc_value, "add_note"):  # Python >= 3.11
                exc_value.add_note(f"live_plot final refresh also failed: {error}")
        finally:
            self._active = False
            if self._own_figure is not None:
                plt.close(self._own_figure)


def live_plot(*keys: str, ax: Axes | None = None, min_interval: float = 1.0) -> LivePlot:
    """Plot ``keys`` against ``step`` in one notebook output that updates as events pass.

    Use it as ``with live_plot("train_loss", "val_loss") as plot:`` and iterate ``pipe(events, plot)``
    (or ``plot(events)``). The first event is drawn at once; later redraws are at least ``min_interval``
    seconds apart (``0``: every event), and leaving the ``with`` block draws the rest. Every point is
    kept. Pass ``ax`` to draw into existing axes (their labels and legend are left to you); otherwise a
    figure is made and closed on exit, and ``plot.ax`` stays available for saving.

    Keys must be nonempty and unique and ``min_interval`` finite and nonnegative (``ValueError``).
    Every event needs a finite ``step``; a missing or non-finite metric leaves a gap; a value ``float()``
    rejects raises before any point of that event is recorded. A plot can be entered once, and iterating
    or ``refresh()`` outside the ``with`` block raises ``RuntimeError``. Without Matplotlib and IPython
    (``pip install 'hotloop[notebook]'``) entering raises ``ImportError``. If the final redraw fails while
    training already raised, the training error is kept, with a note.

    Example:
        >>> plot = live_plot("train_loss", "val_loss", min_interval=0.5)
        >>> plot.refresh()
        Traceback (most recent call last):
        ...
        RuntimeError: Use live_plot inside its 'with' context.
    """
    return LivePlot(keys, ax=ax, min_interval=min_interval)


def plot_history(
    history: Iterable[dict[str, Any]],
    keys: str | Sequence[str],
    path: str | os.PathLike[str],
    *,
    logy: bool = False,
) -> Path:
    """Draw ``keys`` against ``step`` for a finished run and save the figure as a PNG at ``path``.

    ``history`` is an iterable of events (it is consumed; it must end) or the list from ``collect``.
    An event without a key, or with a non-finite value, leaves a gap in that curve; every key must
    appear in at least one event. ``logy`` puts the values on a log scale. Needs Matplotlib (``pip install
    matplotlib``); it draws off-screen with the Agg backend and leaves pyplot's state alone. Returns the
    path written.

    Example:
        >>> import tempfile, pathlib
        >>> history = [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.5, "val_loss": 0.7}]
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = plot_history(history, ["train_loss", "val_loss"], pathlib.Path(folder) / "loss.png")
        ...     out.read_bytes()[:4]
        b'\\x89PNG'
    """
    # Over 60 lines for a reason: argument checks and straight-line matplotlib calls, no logic to split out.
    names = (keys,) if isinstance(keys, str) else keys
    if not isinstance(names, Sequence):
        raise TypeError(f"keys must be a str or a sequence of str, got {type(keys).__name__}")
    if not names:
        raise ValueError("keys must name at least one event key")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"keys must contain nonempty str event keys, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"keys must be unique, got {list(names)}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(logy, bool):
        raise TypeError(f"logy must be a bool, got {type(logy).__name__}")
    if isinstance(history, dict) or not isinstance(history, Iterable):
        raise TypeError(f"history must be an iterable of events, got {type(history).__name__}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_history requires Matplotlib. Install with: pip install matplotlib") from error

    steps: list[float] = []
    curves: dict[str, list[float]] = {name: [] for name in names}
    seen: set[str] = set()
    for index, event in enumerate(history):
        if not isinstance(event, dict):
            raise TypeError(f"history[{index}] must be an event dict, got {type(event).__name__}")
        if "step" not in event:
            raise ValueError(f"history[{index}] has no 'step' key")
        steps.append(float(event["step"]))
        for name in names:
            value = nan
            if name in event:
                seen.add(name)
                value = float(event[name])
            curves[name].append(value if isfinite(value) else nan)
    if not steps:
        raise ValueError("history is empty: nothing to plot")
    missing = [name for name in names if name not in seen]
    if missing:
        raise ValueError(f"keys {missing} appear in none of the {len(steps)} events")

    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name in names:
        ax.plot(steps, curves[name], label=name, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(path)
    figure.savefig(out, format="png")
    return out
