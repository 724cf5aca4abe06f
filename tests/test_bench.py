"""The benchmark harness on a tiny workload: it measures, reports, and survives contenders that fail."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the repository root, for `bench`

from bench import report, run, workloads  # noqa: E402
from bench.contenders import BASELINE, COMPILE_BREAKS, COMPILE_STEP, FUSED, JAX_SCAN, Contender, select  # noqa: E402
from bench.harness import measure  # noqa: E402
from bench.loops import Runner, Skip, installed  # noqa: E402

CPU = torch.device("cpu")


def tiny(loss: str = "mse", **changes) -> workloads.Workload:
    if loss == "mse":
        data, out, loss_fn = workloads.regression_data(4), 1, nn.MSELoss
    else:
        data, out, loss_fn = workloads.class_data(4, classes=3), 3, nn.CrossEntropyLoss
    w = workloads.Workload(
        "tiny",
        f"MLP 4-8-{out} ({loss})",
        data,
        lambda: workloads.mlp(4, 8, out),
        loss_fn,
        workloads.adam,
        8,
        4,
    )
    return replace(w, **changes)


def fake(
    name: str, run=None, setup_error: BaseException | None = None, closed: list | None = None
) -> Contender:
    def setup(w, data, device) -> Runner:
        if setup_error is not None:
            raise setup_error
        return Runner(
            run or (lambda: 0.5), (lambda: closed.append(name)) if closed is not None else lambda: None
        )

    return Contender(name, setup, "a test double")


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_measure_times_every_contender_and_derives_rates():
    result = measure(tiny(), select([BASELINE, "DataLoader loop"]), CPU, repetitions=3)
    rows = {row["contender"]: row for row in result.rows()}
    assert set(rows) == {BASELINE, "DataLoader loop"}
    for row in rows.values():
        assert row["skipped"] is None and row["repetitions"] == 3
        rate = row["steps_per_sec"]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
        assert row["samples_per_sec"]["median"] == pytest.approx(rate["median"] * 8)
        assert row["loss"] > 0
    assert rows[BASELINE]["vs_eager"] == 1.0
    assert result.steps == 4 and result.batch_size == 8


def test_failing_and_skipping_contenders_are_reported_not_raised():
    calls = []

    def flaky() -> float:
        calls.append(1)
        if len(calls) == 3:  # warm-up, repetition 1, then this
            raise RuntimeError("boom\nsecond line")
        return 0.1

    closed: list[str] = []
    contenders = [
        fake("not installed", setup_error=Skip("nothing to run")),
        fake("broken setup", setup_error=ValueError("bad argument")),
        fake("fails in warm-up", run=lambda: 1 / 0, closed=closed),
        fake("fails later", run=flaky, closed=closed),
        fake("fine", closed=closed),
    ]
    result = measure(tiny(), contenders, CPU, repetitions=3)
    why = {o.contender: o.skipped for o in result.outcomes}
    assert why["not installed"] == "nothing to run"
    assert why["broken setup"] == "setup failed: ValueError: bad argument"
    assert why["fails in warm-up"] == "failed in warm-up 1: ZeroDivisionError: division by zero"
    assert why["fails later"] == "failed in repetition 2: RuntimeError: boom"
    assert why["fine"] is None
    assert [o.times for o in result.outcomes if o.contender == "fails later"] == [[]]
    assert sorted(closed) == ["fails in warm-up", "fails later", "fine"]
    rows = {row["contender"]: row for row in result.rows()}
    assert rows["fine"]["vs_eager"] is None  # no eager loop in this run
    assert "steps_per_sec" not in rows["fails later"]


def test_warm_up_is_not_timed_and_rounds_interleave():
    log: list[str] = []

    def runner(name: str):
        def run() -> float:
            if name not in log:
                time.sleep(0.2)  # a slow first (compiling) window
            log.append(name)
            return 0.0

        return run

    result = measure(tiny(), [fake(n, run=runner(n)) for n in "abc"], CPU, repetitions=3, warmup=1)
    assert log[:3] == ["a", "b", "c"]  # everyone warms up before any timed window
    assert log[3:] == ["b", "c", "a", "c", "a", "b", "a", "b", "c"]  # each round starts one further
    for outcome in result.outcomes:
        assert len(outcome.times) == 3 and max(outcome.times) < 0.1


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_eager_loops_train_on_the_same_batches(loss):
    names = [BASELINE, FUSED, "fitstream"] + (["hotloop python"] if installed("hotloop") else [])
    result = measure(tiny(loss), select(names), CPU, repetitions=2)
    losses = {o.contender: o.loss for o in result.outcomes if o.skipped is None}
    assert {BASELINE, FUSED} <= set(losses)
    for name, value in losses.items():
        assert value == pytest.approx(losses[BASELINE], rel=1e-4), name


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_compiled_contenders_train_the_same_weights_on_the_same_batches(optimizer):
    """The torch.compile contenders (the step with graph breaks, the fullgraph functional step) compile,
    run, and train what the eager loop trains: the same window losses, with Adam and SGD with momentum."""
    w = tiny("ce", make_optimizer=getattr(workloads, optimizer))
    names = [BASELINE, COMPILE_STEP] + ([COMPILE_BREAKS] if optimizer == "adam" else [])
    result = measure(w, select(names), CPU, repetitions=2)
    losses = {o.contender: o.loss for o in result.outcomes}
    assert [o.skipped for o in result.outcomes] == [None] * len(names)
    for name, value in losses.items():
        assert value == pytest.approx(losses[BASELINE], rel=1e-4), name
    setup = {o.contender: o.setup_seconds for o in result.outcomes}
    assert all(s is not None and s > 0 for s in setup.values())  # compiling is reported, apart


def test_compiled_step_skips_what_it_was_not_written_for():
    rms = replace(tiny(), make_optimizer=lambda p: torch.optim.RMSprop(p, lr=1e-3))
    (outcome,) = measure(rms, select([COMPILE_STEP]), CPU, repetitions=1).outcomes
    assert outcome.skipped.startswith("the functional update is written for one group of")
    bn = replace(
        tiny(), make_model=lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    )
    (outcome,) = measure(bn, select([COMPILE_STEP]), CPU, repetitions=1).outcomes
    assert outcome.skipped == "written for models without buffers"


def test_ratios_are_against_the_faster_eager_loop():
    def sleeper(seconds: float):
        return lambda: time.sleep(seconds) or 0.0

    contenders = [fake(BASELINE, run=sleeper(0.02)), fake(FUSED, run=sleeper(0.01)), fake("x")]
    rows = {row["contender"]: row for row in measure(tiny(), contenders, CPU, repetitions=2).rows()}
    assert {row["baseline"] for row in rows.values()} == {FUSED}
    assert rows[FUSED]["vs_eager"] == 1.0 and rows[BASELINE]["vs_eager"] < 1.0 < rows["x"]["vs_eager"]


def test_hotloop_engines_run_or_say_why():
    result = measure(
        tiny(), select(["hotloop graph", "hotloop native", "hotloop python"]), CPU, repetitions=1
    )
    for outcome in result.outcomes:
        assert (outcome.skipped is None) == bool(outcome.times)
        assert outcome.skipped is None or outcome.skipped.strip()
    graph = result.outcomes[0]
    assert graph.skipped  # no CUDA graphs on the CPU


@pytest.mark.skipif(not installed("lightning"), reason="lightning is not installed")
def test_lightning_runs_in_windows_and_stops():
    import threading

    before = threading.active_count()
    result = measure(tiny(), select(["Lightning"]), CPU, repetitions=2)
    (outcome,) = result.outcomes
    assert outcome.skipped is None and len(outcome.times) == 2 and outcome.loss > 0
    assert threading.active_count() == before  # the training thread ended


def test_jax_contender_is_optional_and_trains_like_the_eager_loop():
    result = measure(tiny("ce"), select(["jax", "eager-loop"]), CPU, repetitions=2)
    runs = {o.contender: o for o in result.outcomes}
    jax_run, eager_run = runs[JAX_SCAN], runs[BASELINE]
    if not (installed("jax") and installed("optax")):
        assert jax_run.skipped == "jax and optax are not installed (pip install jax optax)"
        return
    assert jax_run.skipped is None and len(jax_run.times) == 2
    # other batch orders, same model, data and Adam: the loss after the same epochs is close
    assert jax_run.loss == pytest.approx(eager_run.loss, rel=0.2)


@pytest.mark.skipif(not (installed("jax") and installed("optax")), reason="jax is not installed")
def test_jax_contender_skips_what_it_cannot_translate():
    (outcome,) = measure(workloads.standard(quick=True)["cnn"], select(["jax"]), CPU, repetitions=1).outcomes
    assert outcome.skipped.startswith("the JAX contender translates MLPs only")


def test_select_rejects_unknown_names():
    assert [c.name for c in select(["EAGER LOOP"])] == [BASELINE]
    assert [c.name for c in select(["compile_fullgraph", "eager-loop"])] == [BASELINE, COMPILE_STEP]
    assert [c.name for c in select(["torch-compile", "EAGER-FUSED"])] == [FUSED, COMPILE_BREAKS]
    assert [c.name for c in select(["hotloop"])] == [
        "hotloop graph",
        "hotloop native",
        "hotloop native, fused optimizer",
        "hotloop aot",
        "hotloop python",
    ]
    with pytest.raises(ValueError, match="unknown contender"):
        select(["eager", "nope"])


def _results():
    ok = measure(
        tiny(), [*select([BASELINE]), fake("broken", setup_error=RuntimeError("no"))], CPU, repetitions=2
    )
    sweep = [
        measure(
            replace(tiny(), param=("batch size", b), batch_size=b), select([BASELINE]), CPU, repetitions=1
        )
        for b in (4, 8)
    ]
    env = {
        "date": "today",
        "device": "cpu",
        "device_name": "a CPU",
        "cpu_count": 2,
        "torch": torch.__version__,
    }
    env.update(python="3", hotloop="0", threads=1)
    return [ok], {"batch size": sweep}, env


def test_reports_are_well_formed(tmp_path):
    results, sweeps, env = _results()
    text = report.table(results + sweeps["batch size"])
    assert BASELINE in text and "broken           skipped: setup failed: RuntimeError: no" in text
    assert "[batch size 4]" in text
    data = json.loads(json.dumps(report.to_json(results, sweeps, env)))
    assert BASELINE in data["baseline"] and FUSED in data["baseline"] and data["environment"] == env
    (workload,) = data["workloads"]
    assert {r["contender"] for r in workload["results"]} == {BASELINE, "broken"}
    assert [p["param"] for p in data["sweeps"]["batch size"]] == [["batch size", 4], ["batch size", 8]]
    md = report.markdown(results, sweeps, env)
    assert "| workload | batch | eager loop |" in md and "| batch size | eager loop |" in md
    assert "(1.00x) |" in md  # the baseline's own ratio is shown
    assert "Seconds before timing starts" in md
    assert "- **broken** skipped on tiny: setup failed: RuntimeError: no" in md
    assert "torch " + torch.__version__ in md
    if report.pyplot() is None:
        pytest.skip("matplotlib is not installed")
    assert report.bar_chart(tmp_path / "bars.png", results, env)
    assert report.sweep_chart(tmp_path / "sweeps.png", sweeps, env)
    for name in ("bars.png", "sweeps.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_number_formatting():
    assert [report.number(v) for v in (1234567, 12345, 999.4, 45.62, 0.1234)] == [
        "1,230,000", "12,300", "999", "45.6", "0.123",
    ]  # fmt: skip


def test_cli_end_to_end(tmp_path, capsys):
    data = run.main(
        ["--workloads", "linreg", "--contenders", f"{BASELINE},graph floor", "--sweep", "none"]
        + ["--repetitions", "1", "--out", str(tmp_path)]
    )
    assert torch.get_num_threads() == 1  # the CPU default
    printed = capsys.readouterr().out
    assert "linreg" in printed and "graph floor      skipped: CUDA only" in printed
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(data))
    with pytest.raises(SystemExit):
        run.main(["--workloads", "nope", "--out", str(tmp_path)])


def test_standard_workloads_build_and_step():
    for w in [
        *workloads.standard(quick=True).values(),
        *workloads.batch_sweep(True),
        *workloads.width_sweep(True),
    ]:
        w = replace(w, steps=1)
        *inputs, labels = w.data(CPU)
        model, optimizer, loss_fn = w.build(CPU)
        loss = loss_fn(model(*inputs), labels)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss), w.name


def test_demo_data_and_training(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from bench import demo

    (x, y), (xv, yv) = demo.digits()
    assert x.shape == (1437, 64) and xv.shape == (360, 64) and set(y.tolist()) == set(range(10))
    assert x.mean(0).abs().max() < 1e-5 and xv.abs().max() < 1e3  # no division by a zero std
    if not installed("hotloop") or not hasattr(__import__("hotloop"), "pipe"):
        pytest.skip("hotloop's stream toolkit is not available")
    monkeypatch.setattr(demo, "OUT", tmp_path)
    history = demo.train(max_epochs=2)
    assert len(history) == 2 and {"train_loss", "val_loss", "val_acc"} <= set(history[0])
    if report.pyplot() is not None:
        assert (tmp_path / "demo_loss.png").exists()


def test_the_recipe_battery_reports_engine_parity_and_speed():
    from bench import recipes

    chosen = [r for r in recipes.RECIPES if r.name in ("MLP, accumulate=4", "MLP, LBFGS", "LSTM")]
    rows = [recipes.run(recipe, epochs=1) for recipe in chosen]
    by_name = {r["recipe"]: r for r in rows}
    assert by_name["MLP, accumulate=4"]["engine"] == "native"
    assert by_name["MLP, LBFGS"]["engine"] == "python" and "closure" in by_name["MLP, LBFGS"]["reason"]
    assert by_name["LSTM"]["engine"] == "python" and "nn.LSTM" in by_name["LSTM"]["reason"]
    assert all(r["parity"] for r in rows)
    assert "1/3 recipes (33%) run natively" in recipes.table(rows)
