"""Windows of tiny models run on one intra-op thread; the user's thread count is back after every window,
also when one ends by an exception, and the results do not change."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import hotloop
import pytest
import torch
from conftest import plain_loop_losses, subprocess_env
from hotloop.speed_rules import ONE_THREAD_BELOW, one_thread_suffices
from torch import nn

SEEN: list[int] = []  # torch.get_num_threads() wherever the probe op ran
FAIL_AT: list[int] = []  # raise on the probe's n-th call in a window (empty: never)


@torch.library.custom_op("hotloop_test::threads_probe", mutates_args=())
def threads_probe(x: torch.Tensor) -> torch.Tensor:
    SEEN.append(torch.get_num_threads())
    if FAIL_AT and len(SEEN) == FAIL_AT[0]:
        raise RuntimeError("probe failed on purpose")
    return x.new_zeros(())


@threads_probe.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


def probed_mse(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # the probe reads the labels only: no gradient flows through it, and it adds zero
    return nn.functional.mse_loss(pred, labels) + threads_probe(labels)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    SEEN.clear()
    FAIL_AT.clear()
    yield
    torch.set_num_threads(before)


def data(features: int = 16, n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g)


def run(model, optimizer, train_data, epochs=2):
    stream = hotloop.fit(
        train_data,
        model,
        optimizer,
        probed_mse,
        batch_size=32,
        generator=torch.Generator().manual_seed(5),
        engine="native",
    )
    try:
        return list(itertools.islice(stream, epochs))
    finally:
        stream.close()


def test_tiny_model_windows_run_on_one_thread_with_unchanged_results(two_threads):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    events = run(model, optimizer, data())
    assert torch.get_num_threads() == 2
    steps_per_epoch = 3
    window_calls = SEEN[-2 * steps_per_epoch :]
    assert window_calls == [1] * len(window_calls)
    assert 2 in SEEN[: -2 * steps_per_epoch]  # the capture check ran with the user's threads
    expected = plain_loop_losses(
        data(),
        twin,
        twin_optimizer,
        nn.MSELoss(),
        batch_size=32,
        steps=2 * steps_per_epoch,
        generator=torch.Generator().manual_seed(5),
    )
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key  # bitwise: the default SGD is replayed


def test_larger_model_windows_keep_the_users_threads(two_threads):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 2048), nn.ReLU(), nn.Linear(2048, 1))  # 32768 weights
    assert model[0].weight.numel() >= ONE_THREAD_BELOW
    run(model, torch.optim.SGD(model.parameters(), lr=0.01), data(), epochs=1)
    assert SEEN and set(SEEN) == {2}
    assert torch.get_num_threads() == 2


def test_threads_are_restored_when_a_window_fails(two_threads):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    FAIL_AT.append(10**9)
    stream = hotloop.fit(
        data(),
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        probed_mse,
        batch_size=32,
        engine="native",
    )
    next(stream)  # captured; one window ran on one thread
    assert SEEN[-1] == 1 and torch.get_num_threads() == 2
    FAIL_AT[0] = len(SEEN) + 2  # the second step of the next window
    with pytest.raises(RuntimeError, match="probe failed on purpose"):
        next(stream)
    assert SEEN[-1] == 1
    assert torch.get_num_threads() == 2
    stream.close()


def test_rule():
    cpu, ops = torch.device("cpu"), ["aten::addmm.", "aten::relu."]
    assert one_thread_suffices(32 * 32, ops, cpu)
    assert not one_thread_suffices(ONE_THREAD_BELOW, ops, cpu)
    assert not one_thread_suffices(0, ops, cpu)
    assert not one_thread_suffices(1024, ops, torch.device("cuda"))
    assert not one_thread_suffices(1024, [*ops, "aten::convolution."], cpu)
    assert not one_thread_suffices(1024, [*ops, "aten::native_batch_norm."], cpu)


def test_tiny_convolutions_keep_the_users_threads_and_round_as_the_plain_loop(two_threads):
    """oneDNN splits a convolution's work across threads even when it is small, so its gradients would
    round differently on one thread than in the user's loop."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 6 * 6, 1)
    )  # its largest tensor, the convolution's output, has 32 * 6 * 12 * 12 < ONE_THREAD_BELOW elements
    x, y = torch.randn(96, 2, 14, 14, generator=torch.Generator().manual_seed(2)), data()[1]
    twin = copy.deepcopy(model)
    stream = hotloop.fit(
        (x, y),
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        probed_mse,
        batch_size=32,
        generator=torch.Generator().manual_seed(5),
        engine="native",
        memory_format="preserve",
    )
    next(stream)
    stream.close()
    assert set(SEEN) == {2}
    plain_loop_losses(
        (x, y),
        twin,
        torch.optim.SGD(twin.parameters(), lr=0.05),
        nn.MSELoss(),
        batch_size=32,
        steps=3,
        generator=torch.Generator().manual_seed(5),
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key


CTRL_C_SCRIPT = """
import os, signal, threading, time, torch
from torch import nn
import hotloop
from hotloop._shared import running_window

torch.set_num_threads(2)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
stream = hotloop.fit((torch.randn(64, 16), torch.randn(64, 1)), model,
                     torch.optim.SGD(model.parameters(), lr=1e-4), nn.MSELoss(), batch_size=8,
                     every=10**8, engine="native")
def interrupt_inside_the_window():
    while running_window() is None:
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=interrupt_inside_the_window, daemon=True).start()
try:
    next(stream)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", torch.get_num_threads())
"""


def test_threads_are_restored_after_ctrl_c():
    out = subprocess.run(
        [sys.executable, "-c", CTRL_C_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert out.stdout.strip() == "interrupted 2", out.stdout + out.stderr
