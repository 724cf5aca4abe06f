"""Native SGD/Adam/AdamW against torch.optim on the same gradients: params and state_dict per window."""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
from hotloop.optim import configure_window, finish_window, native_optimizer, schedule_window

# Fused kernels (the default) against torch.optim's default for-loop implementation: measured worst
# relative difference over these runs is a few 1e-7 (float32 rounding of a different operation order);
# elements near zero are covered by the absolute term. fused=False replays the for-loop: bitwise on CPU.
RTOL, ATOL = 1e-6, 1e-7

SHAPES = [(8, 5), (8,), (3, 8), (3,), (4, 4)]


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]
    ps[4].requires_grad_(False)  # frozen: both loops must leave it (and its state) alone
    return ps


def groups_of(ps, lrs=(0.05, 0.01)):
    return [{"params": ps[:2], "lr": lrs[0]}, {"params": ps[2:], "lr": lrs[1]}]


def grad_stream(ps, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ps] for _ in range(n)]


def reference_steps(opt, ps, grads, lrs=None):
    for k, gs in enumerate(grads):
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone() if p.requires_grad else None
        if lrs is not None:
            for group, group_lrs in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = group_lrs[k]
        opt.step()


def native_steps(handle, opt, ps, grads, lrs=None):
    trainable = [p for p in ps if p.requires_grad]
    configure_window(handle, opt, trainable, lrs_per_step=lrs)
    for gs in grads:
        handle.step([g for p, g in zip(ps, gs, strict=True) if p.requires_grad])
    finish_window(handle, opt)


def assert_close(a, b, exact):
    assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
    if exact:
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact):
    for a, b in zip(nat_ps, ref_ps, strict=True):
        assert_close(a.detach(), b.detach(), exact)
    ref_sd, nat_sd = ref_opt.state_dict(), nat_opt.state_dict()
    assert nat_sd["param_groups"] == ref_sd["param_groups"]
    assert nat_sd["state"].keys() == ref_sd["state"].keys()
    for i, ref_state in ref_sd["state"].items():
        nat_state = nat_sd["state"][i]
        assert list(nat_state) == list(ref_state)
        for key, value in ref_state.items():
            if key == "step":
                assert nat_state[key].dtype == value.dtype and nat_state[key].device == value.device
                assert torch.equal(nat_state[key], value)
            else:
                assert_close(nat_state[key], value, exact)


def run_parity(factory, fused, n_windows=3, steps=7, lr_scale=0.5):
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = factory(groups_of(ref_ps)), factory(groups_of(nat_ps))
    handle, reason = native_optimizer(nat_opt, fused=fused)
    assert reason is None and handle is not None
    grads = grad_stream(ref_ps, n_windows * steps)
    for w in range(n_windows):
        window = grads[w * steps : (w + 1) * steps]
        reference_steps(ref_opt, ref_ps, window)
        native_steps(handle, nat_opt, nat_ps, window)
        assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=not fused)
        for opt in (ref_opt, nat_opt):  # an lr change between windows
            for group in opt.param_groups:
                group["lr"] *= lr_scale
    assert 4 not in nat_opt.state_dict()["state"]  # the frozen param got no state


SGD_OPTIONS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product(
        [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.01], [False, True]
    )
    if not (n and (m == 0 or d != 0))
]
ADAM_OPTIONS = [
    dict(amsgrad=a, weight_decay=wd, maximize=mx)
    for a, wd, mx in itertools.product([False, True], [0.0, 0.1], [False, True])
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forloop"])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=str)
def test_sgd_matches_torch(options, fused):
    run_parity(lambda groups: torch.optim.SGD(groups, **options), fused)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forloop"])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=str)
def test_adam_matches_torch(cls, options, fused):
    run_parity(lambda groups: cls(groups, betas=(0.8, 0.95), **options), fused)


@pytest.mark.parametrize(
    "factory",
    [
        lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True),
        lambda groups: torch.optim.Adam(groups, amsgrad=True, weight_decay=0.1, fused=True),
        lambda groups: torch.optim.AdamW(groups, maximize=True, fused=True),
    ],
    ids=["SGD", "Adam", "AdamW"],
)
def test_fused_matches_torch_fused_bitwise(factory):
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = factory(groups_of(ref_ps)), factory(groups_of(nat_ps))
    handle, _ = native_optimizer(nat_opt)
    grads = grad_stream(ref_ps, 10)
    reference_steps(ref_opt, ref_ps, grads)
    native_steps(handle, nat_opt, nat_ps, grads)
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forloop"])
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_per_step_learning_rates(cls, fused):
    kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = cls(groups_of(ref_ps), **kwargs), cls(groups_of(nat_ps), **kwargs)
    handle, _ = native_optimizer(nat_opt, fused=fused)
    steps = 6
    lrs = [[0.1 / (k + 1) for k in range(steps)], None]  # the second group keeps its lr
    grads = grad_stream(ref_ps, steps)
    reference_steps(ref_opt, ref_ps, grads, lrs=[lrs[0], [0.01] * steps])
    native_steps(handle, nat_opt, nat_ps, grads, lrs=lrs)
    nat_opt.param_groups[0]["lr"] = lrs[0][-1]  # what a precomputing scheduler leaves behind
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=not fused)


def test_running_out_of_learning_rates_fails_before_any_change():
    ps = make_params()
    opt = torch.optim.Adam(groups_of(ps))
    handle, _ = native_optimizer(opt)
    trainable = [p for p in ps if p.requires_grad]
    configure_window(handle, opt, trainable, lrs_per_step=[[0.1], [0.1]])
    grads = [torch.ones_like(p) for p in trainable]
    handle.step(grads)
    before = [p.detach().clone() for p in trainable]
    with pytest.raises(RuntimeError, match="has a schedule for 1 steps in this window"):
        handle.step(grads)
    assert all(torch.equal(a, b) for a, b in zip(before, trainable, strict=True))
    finish_window(handle, opt)
    assert all(float(s["step"]) == 1 for s in opt.state_dict()["state"].values())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forloop"])
@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_save_load_then_continue(cls, fused):
    kwargs = {"momentum": 0.9, "dampening": 0.1} if cls is torch.optim.SGD else {"amsgrad": True}
    ref_ps = make_params()
    ref_opt = cls(groups_of(ref_ps), **kwargs)
    grads = grad_stream(ref_ps, 10)
    reference_steps(ref_opt, ref_ps, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in ref_ps], "opt": ref_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    nat_ps = make_params()
    with torch.no_grad():
        for p, value in zip(nat_ps, saved["params"], strict=True):
            p.copy_(value)
    nat_opt = cls(groups_of(nat_ps), **kwargs)
    nat_opt.load_state_dict(saved["opt"])
    handle, _ = native_optimizer(nat_opt, fused=fused)
    reference_steps(ref_opt, ref_ps, grads[4:])
    native_steps(handle, nat_opt, nat_ps, grads[4:7])
    native_steps(handle, nat_opt, nat_ps, grads[7:])
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=not fused)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_continue_with_plain_torch_loop(cls):
    kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = cls(groups_of(ref_ps), **kwargs), cls(groups_of(nat_ps), **kwargs)
    handle, _ = native_optimizer(nat_opt, fused=False)
    grads = grad_stream(ref_ps, 8)
    reference_steps(ref_opt, ref_ps, grads)
    native_steps(handle, nat_opt, nat_ps, grads[:4])
    reference_steps(nat_opt, nat_ps, grads[4:])
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_window_without_steps_leaves_no_state(cls):
    ps = make_params()
    opt = cls(groups_of(ps), **({"momentum": 0.9} if cls is torch.optim.SGD else {}))
    handle, _ = native_optimizer(opt)
    configure_window(handle, opt)
    assert len(opt.state) == 4  # created for the window
    finish_window(handle, opt)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


def test_scheduler_between_windows():
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = torch.optim.Adam(groups_of(ref_ps)), torch.optim.Adam(groups_of(nat_ps))
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    nat_sched = torch.optim.lr_scheduler.StepLR(nat_opt, step_size=1, gamma=0.5)
    handle, reason = native_optimizer(nat_opt)
    assert reason is None
    grads = grad_stream(ref_ps, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for w in range(3):
            reference_steps(ref_opt, ref_ps, grads[3 * w : 3 * w + 3])
            native_steps(handle, nat_opt, nat_ps, grads[3 * w : 3 * w + 3])
            ref_sched.step()
            nat_sched.step()
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=False)


def test_grads_in_engine_order_and_non_contiguous():
    """grad_params orders step()'s gradients; a transposed gradient is handled like a dense one."""
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = torch.optim.AdamW(groups_of(ref_ps)), torch.optim.AdamW(groups_of(nat_ps))
    handle, _ = native_optimizer(nat_opt)
    grads = grad_stream(ref_ps, 5)
    reference_steps(ref_opt, ref_ps, grads)
    order = [3, 0, 2, 1]
    configure_window(handle, nat_opt, [nat_ps[i] for i in order] + [torch.zeros(2)])
    for gs in grads:
        ordered = [gs[i] if gs[i].dim() < 2 else gs[i].t().contiguous().t() for i in order]
        assert not ordered[1].is_contiguous()
        handle.step(ordered + [torch.zeros(2)])
    finish_window(handle, nat_opt)
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=False)


def test_bad_gradients_fail_without_changing_anything():
    ps = make_params()
    opt = torch.optim.Adam(groups_of(ps))
    handle, _ = native_optimizer(opt)
    trainable = [p for p in ps if p.requires_grad]
    configure_window(handle, opt, trainable)
    with pytest.raises(RuntimeError, match="configured for 4 gradients"):
        handle.step([torch.ones(1)])
    bad = [torch.ones_like(p) for p in trainable]
    bad[2] = torch.ones(5)
    with pytest.raises(RuntimeError, match="gradient of parameter 0 of param group 1"):
        handle.step(bad)
    assert handle.steps_in_window == 0
    assert all(float(opt.state[p]["step"]) == 0 for p in trainable)


class MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda ps: MyAdam(ps), "MyAdam is not native"),
        (lambda ps: torch.optim.Adafactor(ps), "Adafactor is not native"),
        (lambda ps: torch.optim.Adam(ps, differentiable=True), "Adam with differentiable=True is not native"),
        (lambda ps: torch.optim.SGD(ps, differentiable=True), "SGD with differentiable=True is not native"),
        (lambda ps: torch.optim.Adam(ps, capturable=True), "capturable=True needs CUDA parameters"),
    ],
)
def test_not_native_says_why(make, expected):
    opt = make([torch.nn.Parameter(torch.ones(2))])
    handle, reason = native_optimizer(opt)
    assert handle is None and expected in reason


def test_step_hooks_are_not_native():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))])
    opt.register_step_post_hook(lambda *args: None)
    handle, reason = native_optimizer(opt)
    assert handle is None and "step hooks" in reason


def test_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        run_parity(lambda groups: torch.optim.Adam(groups, amsgrad=True), fused=True, n_windows=2)
        run_parity(lambda groups: torch.optim.Adam(groups), fused=False, n_windows=2)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, amsgrad=True, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps),
    ],
    ids=["SGD", "Adam", "AdamW"],
)
def test_complex_and_non_contiguous_params_take_the_for_loop(factory):
    """No fused kernel takes them: they are stepped by the for-loop replica, bitwise like torch.optim."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, dtype=torch.complex64, generator=g), torch.randn(3, 5, generator=g).t()]
    ref_ps = [torch.nn.Parameter(t.clone()) for t in init]
    nat_ps = [torch.nn.Parameter(t.clone()) for t in init]
    assert not nat_ps[1].is_contiguous()
    ref_opt, nat_opt = factory(ref_ps), factory(nat_ps)
    handle, _ = native_optimizer(nat_opt)
    grads = [[torch.randn(p.shape, dtype=p.dtype, generator=g) for p in ref_ps] for _ in range(5)]
    reference_steps(ref_opt, ref_ps, grads)
    native_steps(handle, nat_opt, nat_ps, grads)
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_tensor_learning_rate(cls):
    """A tensor lr is read once per window; torch rounds lr/bias_correction to float32, we keep double."""
    run_parity(lambda groups: cls([dict(g, lr=torch.tensor(g["lr"])) for g in groups]), fused=True)


SCHEDULERS = {
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=40),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, step_size_up=4),
    "warmup+cosine": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
        ],
        milestones=[5],
    ),
}
SCHEDULED_OPTIMIZERS = {
    "SGD": lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True),
    "Adam": lambda groups: torch.optim.Adam(groups, amsgrad=True),
    "AdamW": lambda groups: torch.optim.AdamW(groups),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forloop"])
@pytest.mark.parametrize("opt_name", SCHEDULED_OPTIMIZERS)
@pytest.mark.parametrize("sched_name", SCHEDULERS)
def test_per_step_scheduler_through_windows(sched_name, opt_name, fused):
    """schedule_window: per-step lr and momentum schedules with no Python per step, short windows included."""
    make_opt, make_scheduler = SCHEDULED_OPTIMIZERS[opt_name], SCHEDULERS[sched_name]
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = make_opt(groups_of(ref_ps)), make_opt(groups_of(nat_ps))
    ref_sched, nat_sched = make_scheduler(ref_opt), make_scheduler(nat_opt)
    handle, _ = native_optimizer(nat_opt, fused=fused)
    grads = grad_stream(ref_ps, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for gs in grads:
            reference_steps(ref_opt, ref_ps, [gs])
            ref_sched.step()
        done = 0
        for planned, taken in [
            (8, 8),
            (10, 3),
            (10, 0),
            (10, 10),
            (12, 9),
        ]:  # some cut short (take(), Ctrl-C)
            schedule, settle = schedule_window(nat_sched, planned)
            trainable = [p for p in nat_ps if p.requires_grad]
            configure_window(handle, nat_opt, trainable, **schedule)
            for gs in grads[done : done + taken]:
                handle.step([g for p, g in zip(nat_ps, gs, strict=True) if p.requires_grad])
            finish_window(handle, nat_opt)
            settle(handle.steps_in_window)
            done += taken
    assert done == len(grads)
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=not fused)
    assert nat_sched.state_dict() == ref_sched.state_dict()


def test_scheduler_changing_other_hyperparameters_is_refused():
    ps = make_params()
    opt = torch.optim.SGD(groups_of(ps), momentum=0.9)

    def factor(k):
        opt.param_groups[0]["weight_decay"] = 0.01 * k
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    before = copy.deepcopy(sched.state_dict())
    with pytest.raises(ValueError, match="LambdaLR changes weight_decay from step to step"):
        schedule_window(sched, 5)
    assert sched.state_dict() == before and opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "forloop"])
def test_adam_with_decoupled_weight_decay_is_adamw(fused):
    run_parity(lambda groups: torch.optim.Adam(groups, decoupled_weight_decay=True, weight_decay=0.1), fused)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_mixed_dtypes_in_one_group(cls):
    """A group's float32 and float64 params go to separate fused kernel calls."""
    kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    ref_ps, nat_ps = make_params(), make_params()
    for ps in (ref_ps, nat_ps):
        ps[1].data = ps[1].data.double()
        ps[3].data = ps[3].data.double()
    ref_opt, nat_opt = cls(groups_of(ref_ps), **kwargs), cls(groups_of(nat_ps), **kwargs)
    handle, _ = native_optimizer(nat_opt)
    grads = grad_stream(ref_ps, 6)
    reference_steps(ref_opt, ref_ps, grads)
    native_steps(handle, nat_opt, nat_ps, grads)
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=False)
