"""The graph engine on a GPU: parity with the plain loop, the last-batch graph, lr changes, fallback,
the non-finite guard, Ctrl-C and memory. Skips without CUDA."""

from __future__ import annotations

import copy
import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import hotloop
import pytest
import torch
from hotloop import NonFiniteLossError, SlowPathWarning
from hotloop._native import _C
from torch import nn

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(_C, "WITH_CUDA", False)), reason="needs CUDA and a CUDA build"
)

DEVICE = "cuda"
RTOL = 1e-4  # fused optimizer kernels round a little differently from torch.optim's for-each ones


def regression(n: int = 100, features: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.randn(features, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 1))
    return (x.to(DEVICE), y.to(DEVICE)), model.to(DEVICE)


def plain_loop(
    data, model, optimizer, loss_fn, *, batch_size, steps, every=None, drop_last=False, seed=7, on_event=None
):
    """fitstream's loop on the GPU: the epoch order is torch.randperm(n, generator=g) on the data's device."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    n = data[0].shape[0]
    windows, total, samples, in_window, done = [], 0.0, 0, 0, 0
    while done < steps:
        order = torch.randperm(n, generator=generator, device=DEVICE)
        chunks = list(order.split(batch_size))
        if drop_last and chunks[-1].numel() < batch_size:
            chunks.pop()
        for index in chunks:
            *inputs, labels = [t[index] for t in data]
            loss = loss_fn(model(*inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * index.numel()
            samples += index.numel()
            in_window += 1
            done += 1
            if every is not None and in_window == every:
                windows.append(total / samples)
                total, samples, in_window = 0.0, 0, 0
                if on_event is not None:
                    on_event(len(windows))
            if done == steps:
                break
        if every is None:
            windows.append(total / samples)
            total, samples = 0.0, 0
            if on_event is not None:
                on_event(len(windows))
    return windows


def fit(data, model, optimizer, loss_fn=None, **options):
    options = {"batch_size": 32, "engine": "graph", **options}
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    return hotloop.fit(data, model, optimizer, loss_fn or nn.MSELoss(), generator=generator, **options)


def twin_of(optimizer, model, twin):
    position = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(twin.parameters())
    groups = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [params[position[id(p)]] for p in g["params"]],
        }
        for g in optimizer.param_groups
    ]
    return type(optimizer)(groups)


def assert_close_to(actual, expected, what):
    assert (
        actual.shape == expected.shape and actual.dtype == expected.dtype and actual.device == expected.device
    ), what
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= RTOL * scale + 1e-12, f"{what}: max difference {error:.3g} on a scale of {scale:.3g}"


def assert_parity(model, optimizer, twin, twin_optimizer):
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert_close_to(a, b, name)
    ours, theirs = optimizer.state_dict(), twin_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in ours["state"].items():
        assert state.keys() == theirs["state"][index].keys()
        for key, value in state.items():
            assert_close_to(value, theirs["state"][index][key], f"state {index} {key}")
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close_to(p.grad, q.grad, f"{name}.grad")


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_nesterov_decay": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad_decay": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adam_capturable": lambda p: torch.optim.Adam(p, lr=1e-2, capturable=True),
    "adamw_maximize": lambda p: torch.optim.AdamW(p, lr=1e-3, maximize=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_parity_with_plain_loop(name):
    # 100 samples in batches of 32: every epoch ends with a batch of 4, replayed by the second graph
    data, model = regression()
    optimizer = OPTIMIZERS[name](model.parameters())
    twin = copy.deepcopy(model)
    twin_optimizer = OPTIMIZERS[name](twin.parameters())
    stream = fit(data, model, optimizer)
    events = list(itertools.islice(stream, 3))
    stream.close()
    assert [e["engine"] for e in events] == ["graph"] * 3
    assert [e["updates"] for e in events] == [4, 8, 12]
    expected = plain_loop(data, twin, twin_optimizer, nn.MSELoss(), batch_size=32, steps=12)
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=RTOL)
    assert_parity(model, optimizer, twin, twin_optimizer)


def test_windows_across_epochs_and_drop_last():
    data, model = regression()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    stream = fit(data, model, optimizer, every=5, drop_last=True)
    events = list(itertools.islice(stream, 4))
    stream.close()
    expected = plain_loop(
        data, twin, twin_optimizer, nn.MSELoss(), batch_size=32, steps=20, every=5, drop_last=True
    )
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=RTOL)
    assert [e["epoch"] for e in events] == [1, 3, 5, 6]
    assert_parity(model, optimizer, twin, twin_optimizer)


def test_lr_changes_between_events_take_effect():
    data, model = regression()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    lrs = {1: 3e-2, 2: 0.0}
    stream = fit(data, model, optimizer)
    for i in range(1, 4):
        next(stream)
        if i in lrs:
            optimizer.param_groups[0]["lr"] = lrs[i]
        if i == 2:
            frozen = [p.detach().clone() for p in model.parameters()]
    stream.close()
    for p, before in zip(model.parameters(), frozen, strict=True):
        assert torch.equal(p.detach(), before)  # lr 0 in the third epoch: Adam moves nothing

    def change(i):
        if i in lrs:
            twin_optimizer.param_groups[0]["lr"] = lrs[i]

    plain_loop(data, twin, twin_optimizer, nn.MSELoss(), batch_size=32, steps=12, on_event=change)
    assert_parity(model, optimizer, twin, twin_optimizer)


def test_scheduler_stepped_per_event():
    data, model = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    twin_scheduler = torch.optim.lr_scheduler.StepLR(twin_optimizer, step_size=1, gamma=0.5)
    stream = fit(data, model, optimizer, scheduler=scheduler, scheduler_every="event")
    events = list(itertools.islice(stream, 3))
    stream.close()
    expected = plain_loop(
        data,
        twin,
        twin_optimizer,
        nn.MSELoss(),
        batch_size=32,
        steps=12,
        on_event=lambda i: twin_scheduler.step(),
    )
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=RTOL)
    assert [e["lr"] for e in events] == [0.025, 0.0125, 0.00625]
    assert_parity(model, optimizer, twin, twin_optimizer)


def test_continue_with_a_plain_loop_and_save_the_state():
    data, model = regression()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # keeps its step counts on the CPU
    stream = fit(data, model, optimizer)
    next(stream)
    stream.close()
    steps = [s["step"] for s in optimizer.state.values()]
    assert all(s.device.type == "cpu" and s.item() == 4 for s in steps)
    state = copy.deepcopy(optimizer.state_dict())
    plain_loop(data, model, optimizer, nn.MSELoss(), batch_size=32, steps=4)
    optimizer.load_state_dict(state)
    assert all(s["step"].item() == 4 for s in optimizer.state.values())


class ItemInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max().item())  # synchronises: cannot be captured
        return self.linear(x) / max(scale, 1.0)


def test_a_model_that_cannot_be_captured_falls_back_with_the_capture_error():
    data, _ = regression()
    model = ItemInForward().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="engine='graph' cannot run.*CUDA graph"):
        next(fit(data, model, optimizer, engine="graph"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the warm-ups were undone
    assert not optimizer.state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        event = next(fit(data, model, optimizer, engine="auto"))
    slow = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1 and "graph engine cannot run" in str(slow[0].message)
    assert event["engine"] in ("native", "python")


def test_refusals_say_why():
    data, model = regression()
    optimizer = torch.optim.RMSprop(model.parameters())
    with pytest.raises(RuntimeError, match="RMSprop cannot be captured"):
        next(fit(data, model, optimizer))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(RuntimeError, match="per-step scheduler"):
        next(fit(data, model, optimizer, scheduler=scheduler))


def test_train_metrics_are_accumulated_in_the_graph():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 8, generator=g).to(DEVICE)
    labels = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(DEVICE)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    options = {"metrics": {"train_accuracy": "accuracy"}, "batch_size": 16}
    graph = list(itertools.islice(fit((x, labels), model, optimizer, nn.CrossEntropyLoss(), **options), 2))
    python = list(
        itertools.islice(
            fit((x, labels), twin, twin_optimizer, nn.CrossEntropyLoss(), engine="python", **options), 2
        )
    )
    for a, b in zip(graph, python, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=RTOL)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=1e-9)


def test_nonfinite_loss_is_not_applied():
    data, model = regression()
    x, y = data
    y = y.clone()
    y[37] = float("nan")  # shuffle=False: step 2 (samples 32..63) has a NaN loss
    twin = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    with pytest.raises(NonFiniteLossError) as raised:
        next(fit((x, y), model, optimizer, shuffle=False))
    assert raised.value.step == 2
    # the model holds the weights after step 1, as a plain loop stopped there
    inputs, labels = x[:32], y[:32]
    loss = nn.MSELoss()(twin(inputs), labels)
    twin_optimizer.zero_grad()
    loss.backward()
    twin_optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close_to(a.detach(), b.detach(), "weights")
    assert all(s["step"].item() == 1 for s in optimizer.state.values())
    _, fresh = regression()
    with torch.no_grad():
        first_loss = nn.MSELoss()(fresh(x[:32]), y[:32]).item()
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    events = list(fit((x, y), fresh, optimizer, shuffle=False, on_nonfinite="stop"))
    assert len(events) == 1
    assert events[0]["nonfinite_step"] == 2 and events[0]["updates"] == 1
    assert events[0]["train_loss"] == pytest.approx(first_loss, rel=RTOL)


def test_account_step_kernel():
    sums = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)
    metric = torch.tensor([0.5], dtype=torch.float64, device=DEVICE)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        _C.GraphStep.account_step(
            torch.tensor(2.0, dtype=dtype, device=DEVICE), metric, sums, found_inf, 4.0, True
        )
    assert sums.tolist() == [32.0, 4.0, 8.0] and found_inf.item() == 0
    _C.GraphStep.account_step(torch.tensor(float("inf"), device=DEVICE), metric, sums, found_inf, 4.0, True)
    _C.GraphStep.account_step(torch.tensor(1.0, device=DEVICE), metric, sums, found_inf, 4.0, True)
    assert sums.tolist() == [32.0, 4.0, 8.0] and found_inf.item() == 1  # sticky: later steps add nothing
    _C.GraphStep.account_step(torch.tensor(1.0, device=DEVICE), metric, sums, found_inf, 4.0, False)
    assert sums.tolist() == [36.0, 5.0, 10.0]


def test_graph_step_takes_torch_cuda_graphs():
    # at::cuda::CUDAGraph is bound by torch with a shared_ptr holder; our module shares its pybind11 types
    index = torch.zeros(4, dtype=torch.long, device=DEVICE)
    source = torch.arange(10.0, device=DEVICE)
    out = torch.zeros(4, device=DEVICE)
    sums = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        torch.index_select(source, 0, index, out=out)
        _C.GraphStep.account_step(out.sum(), None, sums, found_inf, 1.0, False)
    step = _C.GraphStep([graph], [index], sums, found_inf, False, [source, out])
    dataset = _C.Dataset([source], 4, False, False, None, False)
    loop = _C.Loop(dataset, step)
    stats = loop.run(3, True)
    assert (stats.steps, stats.samples, stats.loss_sum) == (2, 8, float(sum(range(8))))
    assert step.replays == 2


def test_memory_is_freed_on_close():
    data, model = regression(n=4096)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    next(fit(data, model, optimizer, engine="python"))  # optimizer state and gradients exist from here on
    gc.collect()
    torch.cuda.synchronize()
    baseline_loops, baseline = _C.Loop.live_count(), torch.cuda.memory_allocated()
    for _ in range(3):
        stream = fit(data, model, optimizer)
        next(stream)
        stream.close()
        del stream
        gc.collect()
        assert _C.Loop.live_count() == baseline_loops
        # the static batch buffers, graphs and sums are gone; the gradients stay, as after a plain loop
        assert torch.cuda.memory_allocated() - baseline < 1 << 20


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import time, torch
    from torch import nn
    import hotloop
    torch.manual_seed(0)
    x, y = torch.randn(4096, 16, device="cuda"), torch.randn(4096, 1, device="cuda")
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = hotloop.fit((x, y), model, opt, nn.MSELoss(), batch_size=8, every=10**9, engine="graph")
    print("ready", flush=True)
    try:
        next(stream)
    except KeyboardInterrupt:
        print("interrupted", time.perf_counter(), flush=True)
        stream.close()
        ev = next(hotloop.fit((x, y), model, opt, nn.MSELoss(), batch_size=4096, engine="graph"))
        print("recovered", ev["updates"], flush=True)
    """
)


def test_ctrl_c_stops_a_window_promptly():
    env = dict(os.environ, PYTHONPATH=str(Path(hotloop.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(5.0)  # past the capture
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    lines = out.split("\n")
    assert lines[0].startswith("interrupted"), out
    assert float(lines[0].split()[1]) - sent < 0.5
    assert lines[1] == "recovered 1"


def plain_amp_loop(data, model, optimizer, loss_fn, *, amp, batch_size, steps):
    """A plain mixed-precision loop: autocast forward and loss, GradScaler for fp16."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    n, done, windows = data[0].shape[0], 0, []
    while done < steps:
        total = 0.0
        for index in torch.randperm(n, generator=generator, device=DEVICE).split(batch_size):
            *inputs, labels = [t[index] for t in data]
            with torch.autocast("cuda", dtype=dtype):
                loss = loss_fn(model(*inputs), labels)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * index.numel()
            done += 1
        windows.append(total / n)
    return windows


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision(amp):
    from hotloop.engines.cuda_graph import CudaGraphEngine
    from hotloop.plan import make_plan

    data, model = regression(n=96)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    plan = make_plan(data, model, optimizer, nn.MSELoss(), batch_size=32, amp=amp)
    assert CudaGraphEngine().refuse(plan) is None
    choice = CudaGraphEngine().build(plan)
    dataset = _C.Dataset(list(data), 32, True, False, torch.Generator(device=DEVICE).manual_seed(7), False)
    loop = _C.Loop(dataset, choice.step)
    losses = []
    for _ in range(3):
        choice.begin_window(3)
        stats = loop.run(3, True)
        choice.end_window()
        losses.append(stats.loss_sum / stats.samples)
    expected = plain_amp_loop(data, twin, twin_optimizer, nn.MSELoss(), amp=amp, batch_size=32, steps=9)
    assert losses == pytest.approx(expected, rel=1e-3)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-3, atol=1e-4)


class AutocastInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.net(x).float()


def test_a_model_that_autocasts_itself():
    data, _ = regression()
    torch.manual_seed(0)
    model = AutocastInForward().to(DEVICE)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    events = list(itertools.islice(fit(data, model, optimizer), 2))
    assert [e["engine"] for e in events] == ["graph", "graph"]
    expected = plain_loop(data, twin, twin_optimizer, nn.MSELoss(), batch_size=32, steps=8)
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_through_fit(amp):
    data, model = regression(n=96)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    events = list(itertools.islice(fit(data, model, optimizer, amp=amp, engine="auto"), 3))
    assert [e["engine"] for e in events] == ["graph"] * 3
    expected = plain_amp_loop(data, twin, twin_optimizer, nn.MSELoss(), amp=amp, batch_size=32, steps=9)
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-3)
    python = list(itertools.islice(fit(data, twin, twin_optimizer, amp=amp, engine="python"), 1))
    assert python[0]["engine"] == "python"
