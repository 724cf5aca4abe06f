"""Native optimizers on CUDA: torch keeps non-fused optimizers' steps on the CPU, fused ones' on the GPU."""

from __future__ import annotations

import pytest
import torch
from hotloop.optim import configure_window, finish_window, native_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [(32, 16), (32,), (1, 32), (1,)]


def run(factory, fused_native, steps=12, window=4):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g).cuda() for s in SHAPES] for _ in range(steps)]
    ref_ps = [torch.nn.Parameter(t.cuda()) for t in init]
    nat_ps = [torch.nn.Parameter(t.cuda()) for t in init]
    ref_opt, nat_opt = factory(ref_ps), factory(nat_ps)
    handle, reason = native_optimizer(nat_opt, fused=fused_native)
    assert reason is None
    for k, gs in enumerate(grads):
        for p, grad in zip(ref_ps, gs, strict=True):
            p.grad = grad.clone()
        ref_opt.step()
        if k % window == 0:
            configure_window(handle, nat_opt, nat_ps)
        handle.step(gs)
        if k % window == window - 1:
            finish_window(handle, nat_opt)
    return ref_ps, nat_ps, ref_opt.state_dict(), nat_opt.state_dict()


@pytest.mark.parametrize("fused_native", [True, False], ids=["fused", "forloop"])
@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, amsgrad=True, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, maximize=True),
        lambda ps: torch.optim.Adam(ps, fused=True),
        lambda ps: torch.optim.Adam(ps, capturable=True),
    ],
    ids=["SGD", "Adam", "AdamW", "Adam-fused", "Adam-capturable"],
)
def test_cuda_matches_torch(factory, fused_native):
    ref_ps, nat_ps, ref_sd, nat_sd = run(factory, fused_native)
    for a, b in zip(nat_ps, ref_ps, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    for i, ref_state in ref_sd["state"].items():
        for key, value in ref_state.items():
            got = nat_sd["state"][i][key]
            assert got.device == value.device and got.dtype == value.dtype
            if key == "step":
                assert torch.equal(got, value)
            else:
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
