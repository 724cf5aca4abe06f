"""fit_many against K plain PyTorch loops over the same batches: weights and optimizer state (1e-5
relative), per-model freezing, the fallback, subsets/kfold, the per-model stages, resume."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import hotloop
import pytest
import torch
from hotloop import SlowPathWarning, fit_many, kfold
from torch import nn

K = 8
N, D = 70, 5


def _data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(N, D, generator=g), torch.randn(N, 1, generator=g)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1))


def _optimizer(kind: str, model: nn.Module, k: int, fused: bool = False) -> torch.optim.Optimizer:
    lr = 0.01 * (1 + k % 4)
    wd = 0.0 if k % 3 == 0 else 0.01 * k
    fused_arg = {"fused": True} if fused else {}
    if kind == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=[0.0, 0.9, 0.5][k % 3], weight_decay=wd, **fused_arg
        )
    if kind == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.99 - 0.01 * (k % 2)), **fused_arg
        )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, **fused_arg)


def _setup(kind: str, k: int = K, fused: bool = False):
    models = [_model(s) for s in range(k)]
    return models, [_optimizer(kind, m, i, fused) for i, m in enumerate(models)]


def _plain(models, optimizers, x, y, orders_per_epoch, batch_size, skip=None):
    """K plain loops: model k visits orders_per_epoch[e][k].split(batch_size) in epoch e."""
    loss_fn = nn.MSELoss()
    applied = [0] * len(models)
    for orders in orders_per_epoch:
        for k, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            for idx in orders[k].split(batch_size):
                optimizer.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                if skip is not None and not torch.isfinite(loss):
                    skip.add(k)
                    break
                loss.backward()
                optimizer.step()
                applied[k] += 1
    return applied


def _assert_same(models, optimizers, ref_models, ref_optimizers, only=None):
    for k in range(len(models)) if only is None else only:
        for (name, p), q in zip(models[k].named_parameters(), ref_models[k].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"model {k} {name}")
        mine, ref = optimizers[k].state_dict()["state"], ref_optimizers[k].state_dict()["state"]
        assert mine.keys() == ref.keys()
        for i in ref:
            for key, value in ref[i].items():
                if value is None:
                    assert mine[i][key] is None
                    continue
                torch.testing.assert_close(mine[i][key], value, rtol=1e-5, atol=1e-6, msg=f"{k} {i} {key}")


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("order", ["shared", "independent", "subsets"])
@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
def test_parity_with_k_plain_loops(kind, order, fused):
    # fused=True optimizers take the fused per-row kernel (1e-5 against torch's own fused kernels); the
    # others the op-for-op update
    x, y = _data()
    models, optimizers = _setup(kind, fused=fused)
    ref_models, ref_optimizers = _setup(kind, fused=fused)
    epochs, bs = 3, 16
    if order == "shared":
        stream = fit_many(
            (x, y),
            models,
            optimizers,
            nn.MSELoss(),
            batch_size=bs,
            generator=torch.Generator().manual_seed(5),
            engine="stacked",
        )
        g = torch.Generator().manual_seed(5)
        orders = [[torch.randperm(N, generator=g)] * K for _ in range(epochs)]
    elif order == "independent":
        stream = fit_many(
            (x, y),
            models,
            optimizers,
            nn.MSELoss(),
            batch_size=bs,
            order="independent",
            generator=100,
            engine="stacked",
        )
        gens = [torch.Generator().manual_seed(100 + k) for k in range(K)]
        orders = [[torch.randperm(N, generator=gens[k]) for k in range(K)] for _ in range(epochs)]
    else:
        train, _ = kfold(N, K, torch.Generator().manual_seed(1))  # folds of 8 and 9: train sets of 61/62
        assert len({len(t) for t in train}) == 2
        stream = fit_many(
            (x, y),
            models,
            optimizers,
            nn.MSELoss(),
            batch_size=bs,
            subsets=train,
            generator=torch.Generator().manual_seed(7),
            engine="stacked",
        )
        gens = [torch.Generator().manual_seed(7) for _ in range(K)]
        orders = [
            [train[k][torch.randperm(len(train[k]), generator=gens[k])] for k in range(K)]
            for _ in range(epochs)
        ]
    events = [next(stream) for _ in range(epochs)]
    assert (stream._holder[0].optimizer.row_optimizer is not None) == fused
    _plain(ref_models, ref_optimizers, x, y, orders, bs)
    _assert_same(models, optimizers, ref_models, ref_optimizers)
    assert events[-1]["engine"] == "stacked-native"
    assert len(events[-1]["train_loss"]) == K and events[-1]["active"] == [True] * K
    assert events[-1]["lr"] == [o.param_groups[0]["lr"] for o in optimizers]


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
@pytest.mark.parametrize(
    "options",
    [
        {"kind": torch.optim.Adam, "amsgrad": True, "maximize": True},
        {"kind": torch.optim.AdamW, "amsgrad": True},
        {"kind": torch.optim.SGD, "momentum": 0.9, "nesterov": True, "maximize": True},
    ],
    ids=["adam-amsgrad-maximize", "adamw-amsgrad", "sgd-nesterov-maximize"],
)
def test_parity_with_optimizer_flags(options, fused):
    options = dict(options)
    kind = options.pop("kind")
    x, y = _data()

    def setup():
        models = [_model(s) for s in range(4)]
        extra = {"fused": True} if fused else {}
        optimizers = [
            kind(m.parameters(), lr=0.01 * (1 + k), weight_decay=0.01 * k, **options, **extra)
            for k, m in enumerate(models)
        ]
        return models, optimizers

    (models, optimizers), (ref_models, ref_optimizers) = setup(), setup()
    stream = fit_many(
        (x, y),
        models,
        optimizers,
        lambda pred, target: (
            -nn.functional.mse_loss(pred, target)
            if options.get("maximize")
            else nn.functional.mse_loss(pred, target)
        ),
        batch_size=16,
        generator=torch.Generator().manual_seed(4),
        engine="stacked",
    )
    for _ in range(2):
        next(stream)
    assert (stream._holder[0].optimizer.row_optimizer is not None) == fused
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        for idx in torch.randperm(N, generator=g).split(16):
            for model, optimizer in zip(ref_models, ref_optimizers, strict=True):
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                (-loss if options.get("maximize") else loss).backward()
                optimizer.step()
    _assert_same(models, optimizers, ref_models, ref_optimizers)


def test_train_loss_is_each_models_window_mean():
    x, y = _data()
    models, optimizers = _setup("sgd", 3)
    for o in optimizers:
        o.param_groups[0]["lr"] = 0.0
    event = next(fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=N, shuffle=False))
    for k, model in enumerate(models):
        assert event["train_loss"][k] == pytest.approx(nn.MSELoss()(model(x), y).item(), rel=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
def test_a_diverging_model_freezes_alone(fused):
    x, y = _data()
    models, optimizers = _setup("sgd", fused=fused)
    ref_models, ref_optimizers = _setup("sgd", fused=fused)
    for opts in (optimizers, ref_optimizers):
        opts[3].param_groups[0]["lr"] = 1e18  # diverges within a few steps
    stream = fit_many(
        (x, y), models, optimizers, nn.MSELoss(), batch_size=16, generator=torch.Generator().manual_seed(2)
    )
    events = [next(stream) for _ in range(3)]
    g = torch.Generator().manual_seed(2)
    orders = [[torch.randperm(N, generator=g)] * K for _ in range(3)]
    skipped: set[int] = set()
    applied = _plain(ref_models, ref_optimizers, x, y, orders[:1], 16, skip=skipped)
    assert skipped == {3}
    others = [k for k in range(K) if k != 3]
    _plain(
        [ref_models[k] for k in others],
        [ref_optimizers[k] for k in others],
        x,
        y,
        [[o[0]] * (K - 1) for o in orders[1:]],
        16,
    )
    _assert_same(models, optimizers, ref_models, ref_optimizers, only=others)
    frozen = [e for e in events if "nonfinite_step" in e]
    assert frozen and frozen[0]["nonfinite_step"][3] == applied[3] + 1
    assert [s for k, s in enumerate(frozen[0]["nonfinite_step"]) if k != 3] == [None] * (K - 1)
    assert events[-1]["active"] == [k != 3 for k in range(K)]
    assert all(torch.isfinite(p).all() for p in models[3].parameters())
    torch.testing.assert_close(
        list(models[3].parameters()), list(ref_models[3].parameters()), rtol=1e-5, atol=0.0
    )


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
def test_on_nonfinite_raise_stops_after_the_others_take_that_step(fused):
    x, y = _data()
    models, optimizers = _setup("sgd", fused=fused)
    ref_models, ref_optimizers = _setup("sgd", fused=fused)
    for opts in (optimizers, ref_optimizers):
        opts[3].param_groups[0]["lr"] = 1e18
    stream = fit_many(
        (x, y),
        models,
        optimizers,
        nn.MSELoss(),
        batch_size=16,
        on_nonfinite="raise",
        generator=torch.Generator().manual_seed(2),
    )
    with pytest.raises(hotloop.NonFiniteLossError) as raised:
        for _ in range(3):
            next(stream)
    g = torch.Generator().manual_seed(2)
    orders = [[torch.randperm(N, generator=g)] * K for _ in range(3)]
    skipped: set[int] = set()
    applied = _plain(ref_models[3:4], ref_optimizers[3:4], x, y, [o[3:4] for o in orders], 16, skip=skipped)
    assert skipped == {0}
    bad_step = applied[0] + 1
    assert raised.value.step == bad_step
    steps = [idx for o in orders for idx in o[0].split(16)][:bad_step]
    others = [k for k in range(K) if k != 3]
    for k in others:
        for idx in steps:
            ref_optimizers[k].zero_grad()
            nn.MSELoss()(ref_models[k](x[idx]), y[idx]).backward()
            ref_optimizers[k].step()
    _assert_same(models, optimizers, ref_models, ref_optimizers, only=others)
    assert stream.state_dict()["updates"] == [bad_step - 1 if k == 3 else bad_step for k in range(K)]


def test_different_architectures_fall_back_to_sequential_fit_runs():
    x, y = _data()
    models = [_model(0), nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 1))]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.warns(SlowPathWarning, match="sequential fit"):
        event = next(fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16))
    assert event["engine"].startswith("sequential") and len(event["train_loss"]) == 2
    with pytest.raises(hotloop.many.CaptureError, match="architecture|models\\[1\\]"):
        next(fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16, engine="stacked"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_on_cuda_run_as_sequential_fit_runs_saying_why():
    x, y = (t.cuda() for t in _data())
    models = [_model(k).cuda() for k in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.warns(SlowPathWarning, match="CPU only, the models are on cuda"):
        event = next(fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16))
    assert event["engine"].startswith("sequential") and len(event["train_loss"]) == 2


def test_sequential_equals_stacked():
    x, y = _data()
    a, oa = _setup("adam", 4)
    b, ob = _setup("adam", 4)
    kwargs = dict(batch_size=16, order="independent", generator=9)
    list(zip(range(2), fit_many((x, y), a, oa, nn.MSELoss(), engine="stacked", **kwargs), strict=False))
    list(zip(range(2), fit_many((x, y), b, ob, nn.MSELoss(), engine="sequential", **kwargs), strict=False))
    _assert_same(a, oa, b, ob)


def test_k1_takes_fits_path():
    x, y = _data()
    models, optimizers = _setup("adam", 1)
    event = next(fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16))
    assert event["engine"] == "native" and len(event["train_loss"]) == 1


def test_bad_arguments_are_named():
    x, y = _data()
    models, optimizers = _setup("sgd", 2)
    with pytest.raises(ValueError, match="optimizers"):
        next(fit_many((x, y), models, optimizers[:1], nn.MSELoss()))
    with pytest.raises(ValueError, match="subsets"):
        next(fit_many((x, y), models, optimizers, nn.MSELoss(), subsets=[torch.arange(3)]))
    with pytest.raises(ValueError, match="order"):
        next(fit_many((x, y), models, optimizers, nn.MSELoss(), order="random"))


def test_validation_loss_many_scores_each_model_on_its_fold():
    x, y = _data()
    models, _ = _setup("sgd", 5)
    _, val = kfold(N, 5, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)  # the stacked pass runs natively
        values = hotloop.validation_loss_many((x, y), nn.MSELoss(), subsets=val, batch_size=6)(
            {"model": models}
        )["val_loss"]
    with torch.no_grad():
        expected = [nn.MSELoss()(m(x[v]), y[v]).item() for m, v in zip(models, val, strict=True)]
    assert values == pytest.approx(expected, rel=1e-5)


def test_early_stop_each_freezes_models_and_ends_the_stream():
    x, y = _data()
    models, optimizers = _setup("sgd", 3)
    optimizers[1].param_groups[0]["lr"] = 0.0  # never improves: frozen after `patience` events
    stream = fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16)
    seen = []
    for event in hotloop.pipe(stream, hotloop.early_stop_each("train_loss", patience=2), hotloop.take(40)):
        seen.append(event["active"])
    assert seen[3][1] is False and seen[3][0] is True
    best = hotloop.best_each("train_loss")
    best({"model": models, "train_loss": [1.0, 2.0, 3.0]})
    best({"model": models, "train_loss": [2.0, 1.0, float("nan")]})
    assert best.best == [1.0, 1.0, 3.0]


def test_resume_continues_exactly():
    x, y = _data()
    a, oa = _setup("adam", 3)
    b, ob = _setup("adam", 3)
    train, _ = kfold(N, 3, torch.Generator().manual_seed(0))
    kwargs = dict(batch_size=16, subsets=train, every=3)
    stream = fit_many((x, y), a, oa, nn.MSELoss(), generator=torch.Generator().manual_seed(1), **kwargs)
    full = [next(stream) for _ in range(4)]
    first = fit_many((x, y), b, ob, nn.MSELoss(), generator=torch.Generator().manual_seed(1), **kwargs)
    next(first), next(first)
    state = first.state_dict()
    first.close()
    c, oc = _setup("adam", 3)
    rest = fit_many((x, y), c, oc, nn.MSELoss(), generator=torch.Generator(), resume=state, **kwargs)
    last = [next(rest) for _ in range(2)][-1]
    assert last["train_loss"] == pytest.approx(full[-1]["train_loss"], rel=1e-6)
    _assert_same(a, oa, c, oc)


def test_lr_changed_between_events_is_used():
    x, y = _data()
    a, oa = _setup("sgd", 2)
    b, ob = _setup("sgd", 2)
    stream = fit_many((x, y), a, oa, nn.MSELoss(), batch_size=16, generator=torch.Generator().manual_seed(0))
    next(stream)
    oa[1].param_groups[0]["lr"] = 0.5
    next(stream)
    g = torch.Generator().manual_seed(0)
    orders = [[torch.randperm(N, generator=g)] * 2 for _ in range(2)]
    _plain(b, ob, x, y, orders[:1], 16)
    ob[1].param_groups[0]["lr"] = 0.5
    _plain(b, ob, x, y, orders[1:], 16)
    _assert_same(a, oa, b, ob)


def test_unstackable_module_warns_with_the_reason():
    x, y = _data()
    models, optimizers = _setup("sgd", 2)
    models[0][0].register_forward_hook(lambda *args: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16))
    assert any("hook" in str(w.message) for w in caught if issubclass(w.category, SlowPathWarning))


def test_exit_with_a_live_stream_and_after_close(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "live.py"
    script.write_text(
        "import torch, sys\n"
        "from torch import nn\n"
        "import hotloop\n"
        "ms = [nn.Linear(3, 1) for _ in range(3)]\n"
        "os = [torch.optim.Adam(m.parameters()) for m in ms]\n"
        "x, y = torch.randn(20, 3), torch.randn(20, 1)\n"
        "s = hotloop.fit_many((x, y), ms, os, nn.MSELoss(), batch_size=8)\n"
        "next(s)\n"
        "if sys.argv[1] == 'close':\n"
        "    s.close()\n"
        "    assert ms[0].weight.untyped_storage().nbytes() == 12, ms[0].weight.untyped_storage().nbytes()\n"
    )
    for mode in ("live", "close"):
        env = {**os.environ, "PYTHONPATH": str(Path(hotloop.__file__).parent.parent)}
        result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]


def test_model_objects_are_the_truth_mid_stream():
    x, y = _data()
    models, optimizers = _setup("adam", 3)
    stream = fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16)
    event = next(stream)
    with torch.no_grad():
        for model in models:
            loss = nn.MSELoss()(model(x), y)
            assert torch.isfinite(loss)
            assert all(p.grad is not None for p in model.parameters())
    state = stream.state_dict()
    assert state["models"][0]["0.weight"].untyped_storage().nbytes() == 8 * D * 4
    assert event["updates"] == [5, 5, 5]


def _classification():
    g = torch.Generator().manual_seed(3)
    return torch.randn(60, D, generator=g), torch.randint(0, 3, (60,), generator=g)


def _classifiers(k: int):
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 3)))
    return models


def test_evaluate_many_metrics_per_model_and_fold():
    x, y = _classification()
    models = _classifiers(4)
    _, val = kfold(len(x), 4, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)  # the stacked pass runs natively
        values = hotloop.evaluate_many(
            (x, y), metrics={"acc": "accuracy", "ce": nn.CrossEntropyLoss()}, subsets=val, batch_size=5
        )({"model": models})
    with torch.no_grad():
        for k, (m, v) in enumerate(zip(models, val, strict=True)):
            pred = m(x[v])
            assert values["acc"][k] == pytest.approx((pred.argmax(1) == y[v]).float().mean().item(), rel=1e-6)
            assert values["ce"][k] == pytest.approx(nn.CrossEntropyLoss()(pred, y[v]).item(), rel=1e-5)


def test_train_metrics_per_model():
    x, y = _classification()
    models = _classifiers(3)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    event = next(
        fit_many(
            (x, y), models, optimizers, nn.CrossEntropyLoss(), batch_size=60, metrics={"acc": "accuracy"}
        )
    )
    assert event["engine"] == "stacked-native"
    with torch.no_grad():
        for k, m in enumerate(models):
            assert event["acc"][k] == pytest.approx((m(x).argmax(1) == y).float().mean().item(), rel=1e-6)


def test_every_counts_stacked_steps():
    x, y = _data()
    models, optimizers = _setup("sgd", 2)
    stream = fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16, every=3)
    events = [next(stream) for _ in range(3)]
    assert [e["updates"] for e in events] == [[3, 3], [6, 6], [9, 9]]
    assert events[-1]["epoch"] == 1  # 5 steps per epoch


@pytest.mark.parametrize("order", ["shared", "subsets"])
def test_batchnorm_buffers_match_plain_loops(order):
    # with subsets of 61 and 62 samples the last steps are ragged: a model that sits a step out (and one
    # frozen between events) keeps its running statistics, as its plain loop runs no forward then
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    x, y = _data()
    k = 3 if order == "shared" else 8
    models, refs = [make(i) for i in range(k)], [make(i) for i in range(k)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in refs]
    train = kfold(N, k, torch.Generator().manual_seed(1))[0] if order == "subsets" else None
    stream = fit_many(
        (x, y),
        models,
        opts,
        nn.MSELoss(),
        batch_size=16,
        subsets=train,
        generator=torch.Generator().manual_seed(0),
    )
    assert next(stream)["engine"] == "stacked-native"
    stream.freeze(1)
    next(stream)
    if order == "shared":
        g = torch.Generator().manual_seed(0)
        orders = [[torch.randperm(N, generator=g)] * k for _ in range(2)]
    else:
        gens = [torch.Generator().manual_seed(0) for _ in range(k)]
        orders = [[t[torch.randperm(len(t), generator=gn)] for t, gn in zip(train, gens, strict=True)]]
        orders.append([t[torch.randperm(len(t), generator=gn)] for t, gn in zip(train, gens, strict=True)])
    _plain(refs, ref_opts, x, y, orders[:1], 16)
    others = [i for i in range(k) if i != 1]
    _plain(
        [refs[i] for i in others], [ref_opts[i] for i in others], x, y, [[orders[1][i] for i in others]], 16
    )
    for m, r in zip(models, refs, strict=True):
        for (name, a), b in zip(m.state_dict().items(), r.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_falls_back_with_the_reason():
    x, y = _data()
    models = [nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.5), nn.Linear(8, 1)) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.warns(SlowPathWarning, match="sequential"):
        event = next(fit_many((x, y), models, opts, nn.MSELoss(), batch_size=16))
    assert event["engine"].startswith("sequential")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_weight_decay_switched_on_between_events(kind):
    x, y = _data()
    a, oa = _setup(kind, 2)
    b, ob = _setup(kind, 2)
    for opts in (oa, ob):
        for o in opts:
            o.param_groups[0]["weight_decay"] = 0.0
    stream = fit_many((x, y), a, oa, nn.MSELoss(), batch_size=16, generator=torch.Generator().manual_seed(0))
    next(stream)
    oa[1].param_groups[0]["weight_decay"] = 0.1
    next(stream)
    g = torch.Generator().manual_seed(0)
    orders = [[torch.randperm(N, generator=g)] * 2 for _ in range(2)]
    _plain(b, ob, x, y, orders[:1], 16)
    ob[1].param_groups[0]["weight_decay"] = 0.1
    _plain(b, ob, x, y, orders[1:], 16)
    _assert_same(a, oa, b, ob)


def _wide_run(k: int = 4, lr: float = 1e-3):
    torch.manual_seed(0)
    x, y = torch.randn(256, D), torch.randn(256, 1)
    models = [_model(s) for s in range(k)]
    return (x, y), models, [torch.optim.Adam(m.parameters(), lr=lr) for m in models]


def _replay(models, optimizers, data, steps, batch_size, seed):
    """K plain loops over fit_many's shared order for ``steps`` steps."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            if done == steps:
                break
            for model, optimizer in zip(models, optimizers, strict=True):
                optimizer.zero_grad()
                nn.MSELoss()(model(x[idx]), y[idx]).backward()
                optimizer.step()
            done += 1


def test_ctrl_c_stops_a_window_between_two_steps():
    # SIGINT while the C++ loop runs a long stacked window: KeyboardInterrupt at a step boundary, every
    # model's weights and optimizer state those of K plain loops after that many steps, and the stream
    # still checkpoints.
    import os
    import signal
    import threading
    import time

    from hotloop._shared import running_window

    data, models, optimizers = _wide_run()
    stream = fit_many(
        data,
        models,
        optimizers,
        nn.MSELoss(),
        batch_size=4,
        every=10**7,
        generator=torch.Generator().manual_seed(3),
        engine="stacked",
    )

    def interrupt_when_running() -> None:
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and (running_window() or (0, 0))[0] < 50:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert time.perf_counter() - started < 50, "the window was not interrupted"
    counts = {float(state["step"]) for o in optimizers for state in o.state.values()}
    assert len(counts) == 1, f"the models stopped at different steps: {counts}"
    steps = int(counts.pop())
    assert 50 <= steps < 10**7
    state = stream.state_dict()
    assert state["updates"] == [steps] * len(models)
    _, ref_models, ref_optimizers = _wide_run()
    _replay(ref_models, ref_optimizers, data, steps, 4, seed=3)
    _assert_same(models, optimizers, ref_models, ref_optimizers)
    stream.close()


def test_resume_after_ctrl_c_continues_the_data_order():
    import os
    import signal
    import threading
    import time

    from hotloop._shared import running_window

    # the interrupted run drew the orders of several epochs ahead (the window spans many): the ones it did
    # not reach are drawn again after resuming, as a plain loop draws them
    data, models, optimizers = _wide_run()
    every = 1000
    stream = fit_many(
        data,
        models,
        optimizers,
        nn.MSELoss(),
        batch_size=4,
        every=every,
        generator=torch.Generator().manual_seed(3),
        engine="stacked",
    )
    next(stream)

    def interrupt_mid_window() -> None:
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and (running_window() or (0, 0))[0] < 30:
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_mid_window, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    state = stream.state_dict()
    done = state["updates"][0]
    assert every + 24 < done < 2 * every  # stopped inside the window, past its first epoch's end
    stream.close()
    resumed = fit_many(
        data,
        models,
        optimizers,
        nn.MSELoss(),
        batch_size=4,
        every=every,
        generator=torch.Generator().manual_seed(3),
        engine="stacked",
        resume=state,
    )
    next(resumed)
    assert [float(s["step"]) for s in optimizers[0].state.values()][0] == done + every
    _, ref_models, ref_optimizers = _wide_run()
    _replay(ref_models, ref_optimizers, data, done + every, 4, seed=3)
    _assert_same(models, optimizers, ref_models, ref_optimizers)


def test_running_window_reports_progress_inside_a_stacked_window():
    import threading
    import time

    from hotloop._shared import running_window

    data, models, optimizers = _wide_run()
    steps = 3000
    stream = fit_many(data, models, optimizers, nn.MSELoss(), batch_size=4, every=steps, engine="stacked")
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            window = running_window()
            if window is not None:
                seen.append(window)
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    event = next(stream)
    done.set()
    poller.join()
    assert event["updates"] == [steps] * len(models)
    assert running_window() is None
    assert seen, "the poller never saw the window running"
    assert all(planned == steps and 0 <= n <= steps for n, planned in seen)
    assert any(0 < n < steps for n, _ in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def _bn_models(k: int) -> list[nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        with torch.no_grad():
            model[1].running_mean.normal_()
            model[1].running_var.uniform_(0.5, 2.0)
        models.append(model)
    return models


@pytest.mark.parametrize("use_subsets", [False, True], ids=["shared", "subsets"])
def test_evaluate_many_runs_natively_and_sees_new_weights(use_subsets):
    # no SlowPathWarning: the stacked forward is captured and run by the C++ evaluator; each model in eval
    # mode (BatchNorm's running statistics), batches of 4 with a remainder, values read again after the
    # weights change in place
    x, y = _data()
    models = _bn_models(4)
    _, val = kfold(N, 4, torch.Generator().manual_seed(0))
    subsets = val if use_subsets else None
    stage = hotloop.validation_loss_many((x, y), nn.MSELoss(), subsets=subsets, batch_size=4)

    def expected() -> list[float]:
        for m in models:
            m.eval()
        with torch.no_grad():
            sets = val if use_subsets else [torch.arange(N)] * 4
            values = [nn.MSELoss()(m(x[v]), y[v]).item() for m, v in zip(models, sets, strict=True)]
        for m in models:
            m.train()
        return values

    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        first = stage({"model": models})["val_loss"]
        assert first == pytest.approx(expected(), rel=1e-5)
        with torch.no_grad():
            for k, m in enumerate(models):
                m[0].weight.add_(0.1 * (k + 1))
                m[1].running_mean.add_(0.5)
        second = stage({"model": models})["val_loss"]
    assert second == pytest.approx(expected(), rel=1e-5)
    assert second != first
    assert all(m.training for m in models)


def test_evaluate_many_metric_reading_values_in_python_falls_back_with_the_reason():
    x, y = _data()
    models, _ = _setup("sgd", 3)

    def worst(pred, labels):
        return torch.tensor(float((pred - labels).abs().max().item()))

    with pytest.warns(SlowPathWarning, match="eagerly"):
        values = hotloop.evaluate_many((x, y), metrics={"worst": worst})({"model": models})["worst"]
    with torch.no_grad():
        assert values == pytest.approx([worst(m(x), y).item() for m in models], rel=1e-6)


@pytest.mark.parametrize("engine", ["stacked", "sequential"])
def test_freeze_names_a_model_out_of_range(engine):
    x, y = _data()
    models, optimizers = _setup("sgd", 2)
    if engine == "sequential":  # different architectures: K fit runs in lock-step
        models[1] = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 1))
        optimizers[1] = torch.optim.SGD(models[1].parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        stream = fit_many((x, y), models, optimizers, nn.MSELoss(), batch_size=16)
        event = next(stream)
    assert event["engine"].startswith(engine)
    with pytest.raises(IndexError, match="model index 2 out of range for 2 models"):
        stream.freeze(2)
    stream.freeze(1)
    assert next(stream)["active"] == [True, False]
    stream.close()


def test_a_loss_that_is_not_one_value_is_refused_naming_it():
    x, y = _data()
    models, optimizers = _setup("sgd", 2)
    with pytest.raises(hotloop.many.CaptureError, match="loss_fn must return a single value, got shape"):
        loss_fn = nn.MSELoss(reduction="none")
        next(fit_many((x, y), models, optimizers, loss_fn, batch_size=16, engine="stacked"))
