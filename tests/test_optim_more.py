"""The native optimizers after SGD/Adam against torch.optim on the same gradients: params and state_dict.

The for-loop replicas are bitwise equal to torch.optim's default (single-tensor) implementation on CPU;
Adagrad's fused kernel and torch's foreach implementations are compared within test_optim's tolerance.
"""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
from hotloop.optim import configure_window, finish_window, native_optimizer, schedule_window
from test_optim import assert_same_state, grad_stream, groups_of, make_params, native_steps, reference_steps

optim = torch.optim


def product(**choices):
    names = list(choices)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*choices.values())]


# Every option of each optimizer, crossed; lr is per group (groups_of). The defaults are in each list.
OPTIONS = {
    "RMSprop": product(
        alpha=[0.99, 0.8],
        momentum=[0.0, 0.9],
        centered=[False, True],
        weight_decay=[0.0, 0.01],
        maximize=[False, True],
    ),
    "Adagrad": product(
        lr_decay=[0.0, 0.1],
        initial_accumulator_value=[0.0, 0.5],
        weight_decay=[0.0, 0.01],
        eps=[1e-10, 1e-3],
        maximize=[False, True],
    ),
    "Adamax": product(betas=[(0.9, 0.999), (0.8, 0.95)], weight_decay=[0.0, 0.01], maximize=[False, True]),
    "NAdam": product(
        betas=[(0.9, 0.999), (0.8, 0.95)],
        momentum_decay=[4e-3, 0.1],
        weight_decay=[0.0, 0.01],
        decoupled_weight_decay=[False, True],
        maximize=[False, True],
    ),
    "RAdam": product(
        betas=[(0.9, 0.999), (0.8, 0.95)],  # rho_t passes 5 at step 6 or 3: both branches run
        weight_decay=[0.0, 0.01],
        decoupled_weight_decay=[False, True],
        maximize=[False, True],
    ),
    "ASGD": product(
        lambd=[1e-4, 0.05], alpha=[0.75, 0.5], t0=[1e6, 4.0], weight_decay=[0.0, 0.01], maximize=[False, True]
    ),
    "Rprop": product(
        etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50), (1e-3, 0.02)], maximize=[False, True]
    ),
    "Adadelta": product(rho=[0.9, 0.5], eps=[1e-6, 1e-3], weight_decay=[0.0, 0.01], maximize=[False, True]),
}
CASES = [(name, options) for name, choices in OPTIONS.items() for options in choices]


def factory(name, **options):
    return lambda groups: getattr(optim, name)(groups, **options)


def run_parity(make, fused=False, exact=True, n_windows=3, steps=7, lr_scale=0.5, params=make_params):
    """Windows of native steps against torch.optim steps on the same gradients; lr changes in between."""
    ref_ps, nat_ps = params(), params()
    ref_opt, nat_opt = make(groups_of(ref_ps)), make(groups_of(nat_ps))
    handle, reason = native_optimizer(nat_opt, fused=fused)
    assert reason is None and handle is not None
    grads = grad_stream(ref_ps, n_windows * steps)
    for w in range(n_windows):
        window = grads[w * steps : (w + 1) * steps]
        reference_steps(ref_opt, ref_ps, window)
        native_steps(handle, nat_opt, nat_ps, window)
        assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=exact)
        for opt in (ref_opt, nat_opt):
            for group in opt.param_groups:
                group["lr"] *= lr_scale
    return ref_opt, nat_opt


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_matches_torch_bitwise(name, options):
    run_parity(factory(name, **options))


@pytest.mark.parametrize("options", OPTIONS["Adagrad"], ids=str)
def test_adagrad_fused_kernel_matches_torch(options):
    run_parity(factory("Adagrad", **options), fused=True, exact=False)


def test_adagrad_fused_matches_torch_fused_bitwise():
    run_parity(factory("Adagrad", lr_decay=0.1, weight_decay=0.01, fused=True), fused=True)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_foreach_implementation_within_tolerance(name):
    """foreach=True runs torch's multi-tensor implementation: same algorithm, other rounding."""
    options = {"weight_decay": 0.01} if name != "Rprop" else {}
    run_parity(factory(name, foreach=True, maximize=True, **options), exact=False)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_complex_and_non_contiguous_params(name):
    def params():
        g = torch.Generator().manual_seed(0)
        return [
            torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=g)),
            torch.nn.Parameter(torch.randn(3, 5, generator=g).t()),
            torch.nn.Parameter(torch.randn(3, generator=g)),
        ]

    ref_opt, nat_opt = run_parity(factory(name), params=params)
    assert not nat_opt.param_groups[0]["params"][1].is_contiguous()


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_float64_default_dtype(name):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref_opt, nat_opt = run_parity(factory(name), n_windows=2)
    finally:
        torch.set_default_dtype(previous)
    assert nat_opt.state_dict()["state"][0]["step"].dtype == torch.float64


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_tensor_learning_rate(name):
    """A tensor lr is read once per window; torch's scalar math then runs in float32, ours in double."""
    run_parity(
        lambda groups: getattr(optim, name)([dict(g, lr=torch.tensor(g["lr"])) for g in groups]), exact=False
    )


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_save_load_then_continue(name):
    """Resume from a torch.save'd state dict (load_state_dict casts some state to the param dtype)."""
    ref_ps = make_params(dtype=torch.float64)
    make = factory(name)
    ref_opt = make(groups_of(ref_ps))
    grads = grad_stream(ref_ps, 10)
    reference_steps(ref_opt, ref_ps, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in ref_ps], "opt": ref_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    buffer.seek(0)
    ref_opt.load_state_dict(torch.load(buffer)["opt"])  # the same casts on both sides
    nat_ps = make_params(dtype=torch.float64)
    with torch.no_grad():
        for p, value in zip(nat_ps, saved["params"], strict=True):
            p.copy_(value)
    nat_opt = make(groups_of(nat_ps))
    nat_opt.load_state_dict(saved["opt"])
    handle, _ = native_optimizer(nat_opt, fused=False)
    reference_steps(ref_opt, ref_ps, grads[4:])
    native_steps(handle, nat_opt, nat_ps, grads[4:7])
    native_steps(handle, nat_opt, nat_ps, grads[7:])
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_continue_with_plain_torch_loop(name):
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = factory(name)(groups_of(ref_ps)), factory(name)(groups_of(nat_ps))
    handle, _ = native_optimizer(nat_opt, fused=False)
    grads = grad_stream(ref_ps, 8)
    reference_steps(ref_opt, ref_ps, grads)
    native_steps(handle, nat_opt, nat_ps, grads[:4])
    reference_steps(nat_opt, nat_ps, grads[4:])
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)


@pytest.mark.parametrize("name", sorted(set(OPTIONS) - {"Adagrad"}))
def test_window_without_steps_leaves_no_state(name):
    ps = make_params()
    opt = factory(name)(groups_of(ps))
    handle, _ = native_optimizer(opt)
    configure_window(handle, opt)
    assert len(opt.state) == 4  # created for the window
    finish_window(handle, opt)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


def test_adagrad_state_exists_from_construction():
    """Adagrad creates its state in __init__, frozen params included; a native window keeps it as is."""
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = optim.Adagrad(groups_of(ref_ps)), optim.Adagrad(groups_of(nat_ps))
    handle, _ = native_optimizer(nat_opt)
    configure_window(handle, nat_opt)
    finish_window(handle, nat_opt)
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)
    assert 4 in nat_opt.state_dict()["state"]


MOMENTUM_SCHEDULED = {
    "RMSprop": lambda groups: optim.RMSprop(groups, momentum=0.9, centered=True),
    "Adamax": lambda groups: optim.Adamax(groups),
    "NAdam": lambda groups: optim.NAdam(groups, decoupled_weight_decay=True, weight_decay=0.01),
    "RAdam": lambda groups: optim.RAdam(groups),
}
SCHEDULERS = {
    "OneCycleLR": lambda opt: optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=40),
    "CyclicLR": lambda opt: optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, step_size_up=4),
    "CosineAnnealingLR": lambda opt: optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20),
}
SCHEDULED = {
    **MOMENTUM_SCHEDULED,
    **{name: factory(name) for name in ("Adagrad", "ASGD", "Rprop", "Adadelta")},
}


@pytest.mark.parametrize("opt_name", sorted(SCHEDULED))
@pytest.mark.parametrize("sched_name", SCHEDULERS)
def test_per_step_scheduler_through_windows(sched_name, opt_name):
    """schedule_window: per-step lr (and momentum / beta1 where the scheduler cycles it), short windows."""
    if opt_name not in MOMENTUM_SCHEDULED and sched_name != "CosineAnnealingLR":
        pytest.skip("cycling momentum needs a momentum or betas option")
    make_opt, make_scheduler = SCHEDULED[opt_name], SCHEDULERS[sched_name]
    ref_ps, nat_ps = make_params(), make_params()
    ref_opt, nat_opt = make_opt(groups_of(ref_ps)), make_opt(groups_of(nat_ps))
    ref_sched, nat_sched = make_scheduler(ref_opt), make_scheduler(nat_opt)
    handle, _ = native_optimizer(nat_opt, fused=False)
    grads = grad_stream(ref_ps, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for gs in grads:
            reference_steps(ref_opt, ref_ps, [gs])
            ref_sched.step()
        done = 0
        for planned, taken in [(8, 8), (10, 3), (10, 0), (10, 10), (12, 9)]:
            schedule, settle = schedule_window(nat_sched, planned)
            trainable = [p for p in nat_ps if p.requires_grad]
            configure_window(handle, nat_opt, trainable, **schedule)
            for gs in grads[done : done + taken]:
                handle.step([g for p, g in zip(nat_ps, gs, strict=True) if p.requires_grad])
            finish_window(handle, nat_opt)
            settle(handle.steps_in_window)
            done += taken
    assert_same_state(ref_opt, nat_opt, ref_ps, nat_ps, exact=True)
    assert nat_sched.state_dict() == ref_sched.state_dict()


def test_rmsprop_momentum_schedule_needs_a_momentum_buffer():
    ps = make_params()
    opt = optim.RMSprop(groups_of(ps))  # momentum 0: torch creates no momentum_buffer
    handle, _ = native_optimizer(opt)
    with pytest.raises(RuntimeError, match="RMSprop needs the state 'momentum_buffer'"):
        configure_window(handle, opt, momenta_per_step=[[0.9], None])


class MyRMSprop(optim.RMSprop):
    pass


def one_param():
    return [torch.nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda ps: MyRMSprop(ps), "MyRMSprop is not native (native optimizers: torch.optim's SGD, Adam"),
        (lambda ps: optim.Adafactor(ps), "Adafactor is not native"),
        (lambda ps: optim.SparseAdam(ps), "SparseAdam steps sparse gradients only"),
        (lambda ps: optim.LBFGS(ps), "LBFGS.step requires a closure"),
        (lambda ps: optim.RMSprop(ps, capturable=True), "RMSprop with capturable=True is not native"),
        (lambda ps: optim.NAdam(ps, capturable=True), "NAdam with capturable=True is not native"),
        (lambda ps: optim.ASGD(ps, capturable=True), "ASGD with capturable=True is not native"),
        (lambda ps: optim.Adagrad(ps, differentiable=True), "Adagrad with differentiable=True is not native"),
        (lambda ps: optim.Rprop(ps, differentiable=True), "Rprop with differentiable=True is not native"),
    ],
    ids=[
        "subclass",
        "Adafactor",
        "SparseAdam",
        "LBFGS",
        "RMSprop-capturable",
        "NAdam-capturable",
        "ASGD-capturable",
        "Adagrad-differentiable",
        "Rprop-differentiable",
    ],
)
def test_not_native_says_why(make, expected):
    handle, reason = native_optimizer(make(one_param()))
    assert handle is None and expected in reason


def test_state_missing_a_key_is_not_native():
    ps = one_param()
    opt = optim.RMSprop(ps, momentum=0.0)
    opt.state[ps[0]] = {"step": torch.tensor(1.0), "square_avg": torch.zeros(2)}
    opt.param_groups[0]["momentum"] = 0.9  # torch's step would fail: no momentum_buffer
    handle, reason = native_optimizer(opt)
    assert handle is None and "RMSprop state of a parameter lacks momentum_buffer" in reason
