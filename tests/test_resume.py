"""Resume: a run saved after event k and resumed in a new process matches the uninterrupted run bitwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import hotloop
import pytest
import torch
from conftest import subprocess_env
from torch import nn

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import hotloop

    mode, path, out, engine, with_generator = sys.argv[1:6]
    torch.manual_seed(0)
    x, y = torch.randn(100, 8), torch.randn(100, 1)
    torch.manual_seed(int(mode == "resume") + 10)  # a resumed process starts from different weights and RNG
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3) if with_generator == "1" else None
    resume = torch.load(path, weights_only=False) if mode == "resume" else None
    stream = hotloop.fit((x, y), model, opt, nn.MSELoss(), batch_size=16, every=5, generator=generator,
                         engine=engine, resume=resume)
    losses = []
    for index, event in enumerate(stream, start=1):
        losses.append((event["step"], event["updates"], event["epoch"], event["train_loss"]))
        if mode == "full" and index == 3:
            torch.save(stream.state_dict(), path)
        if index == (7 if mode == "full" else 4):
            break
    torch.save({"events": losses, "model": model.state_dict(), "opt": opt.state_dict()}, out)
    """
)


def run(mode: str, state: Path, out: Path, engine: str, with_generator: bool) -> dict:
    env = subprocess_env()
    subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(state), str(out), engine, str(int(with_generator))],
        check=True,
        env=env,
    )
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("engine", ["python", "native"])
@pytest.mark.parametrize("with_generator", [True, False])
def test_resume_in_a_new_process_is_bit_identical(tmp_path, engine, with_generator):
    state = tmp_path / "state.pt"
    full = run("full", state, tmp_path / "full.pt", engine, with_generator)
    resumed = run("resume", state, tmp_path / "resumed.pt", engine, with_generator)
    assert resumed["events"] == full["events"][3:]
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for index, entry in full["opt"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, resumed["opt"]["state"][index][name]), name


def test_state_dict_before_the_first_event_is_an_error():
    model = nn.Linear(2, 1)
    stream = hotloop.fit(
        (torch.randn(4, 2), torch.randn(4, 1)),
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        nn.MSELoss(),
    )
    with pytest.raises(RuntimeError, match="has not started"):
        stream.state_dict()


def test_resume_rejects_a_state_for_other_data():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = hotloop.fit(
        (torch.randn(8, 2), torch.randn(8, 1)), model, opt, nn.MSELoss(), batch_size=2, every=1
    )
    next(stream)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="saved for 8 samples, but train_data has 6"):
        next(
            hotloop.fit(
                (torch.randn(6, 2), torch.randn(6, 1)), model, opt, nn.MSELoss(), batch_size=2, resume=state
            )
        )
    with pytest.raises(TypeError, match="resume must be the dict returned by FitStream.state_dict"):
        next(hotloop.fit((torch.randn(6, 2), torch.randn(6, 1)), model, opt, nn.MSELoss(), resume={"a": 1}))


def test_resume_with_other_batching_is_rejected_before_anything_is_loaded():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (torch.randn(8, 2), torch.randn(8, 1))
    stream = hotloop.fit(data, model, opt, nn.MSELoss(), batch_size=2, every=1)
    next(stream)
    state = stream.state_dict()
    with torch.no_grad():
        model.weight.fill_(7.0)
    with pytest.raises(ValueError, match="saved with batch_size=2, this fit\\(\\) call has batch_size=3"):
        next(hotloop.fit(data, model, opt, nn.MSELoss(), batch_size=3, resume=state))
    with pytest.raises(ValueError, match="disagree on whether a generator is given"):
        next(
            hotloop.fit(
                data, model, opt, nn.MSELoss(), batch_size=2, generator=torch.Generator(), resume=state
            )
        )
    assert torch.all(model.weight == 7.0)


@pytest.mark.parametrize("engine", ["python", "native"])
def test_unshuffled_runs_resume_mid_epoch(engine):
    torch.manual_seed(0)
    data = (torch.randn(10, 3), torch.randn(10, 1))
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stream = hotloop.fit(data, model, opt, nn.MSELoss(), batch_size=2, shuffle=False, every=3, engine=engine)
    next(stream)
    state = stream.state_dict()
    expected = [next(stream)["train_loss"] for _ in range(3)]
    resumed = hotloop.fit(
        data, model, opt, nn.MSELoss(), batch_size=2, shuffle=False, every=3, engine=engine, resume=state
    )
    assert [next(resumed)["train_loss"] for _ in range(3)] == expected
