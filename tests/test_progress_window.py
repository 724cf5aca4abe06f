"""Progress inside a long native window: running_window() polled from another thread, and the bar."""

from __future__ import annotations

import io
import sys
import threading
import time

import hotloop
import pytest
import torch
from conftest import mlp
from hotloop._shared import running_window
from torch import nn


@pytest.mark.parametrize("engine", ["native", "python"])
def test_running_window_reports_progress_while_the_loop_runs(engine):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = 3000
    stream = hotloop.fit(
        (torch.randn(256, 16), torch.randn(256, 1)),
        model,
        opt,
        nn.MSELoss(),
        batch_size=4,
        every=steps,
        engine=engine,
    )
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            window = running_window()
            if window is not None:
                seen.append(window)
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    next(stream)
    done.set()
    poller.join()
    assert running_window() is None
    assert seen, "the poller never saw the window running"
    assert all(planned == steps and 0 <= n <= steps for n, planned in seen)
    assert any(0 < n < steps for n, _ in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_a_window_bar_during_long_windows(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    stream = hotloop.fit(
        (torch.randn(256, 16), torch.randn(256, 1)),
        model,
        opt,
        nn.MSELoss(),
        batch_size=2,
        every=20000,
        engine="native",
    )
    events = list(
        hotloop.pipe(stream, hotloop.take(1), hotloop.progress(1, keys=("train_loss",), poll_interval=0.01))
    )
    assert len(events) == 1
    output = terminal.getvalue()
    assert "window" in output and "/20000" in output


def test_progress_rejects_bad_window_options():
    with pytest.raises(TypeError, match="window must be a bool"):
        hotloop.progress(window="yes")
    with pytest.raises(ValueError, match="poll_interval must be a positive number"):
        hotloop.progress(poll_interval=0)
