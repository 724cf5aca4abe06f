"""The fidelity battery: tricky user code on every CPU engine against the plain PyTorch loop.

For each case the outcome is one of exactly two: the same weights as the plain loop, or a fallback (with
``engine="auto"``) whose SlowPathWarning names the cause and whose python engine then matches the plain loop.
A silent difference fails.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import hotloop
import pytest
import torch
from conftest import mlp, plain_loop_losses
from torch import nn
from torch.nn import functional as F

RTOL = 1e-6  # relative to each tensor's largest magnitude


@dataclass
class Case:
    make_model: Callable[[], nn.Module]
    make_loss: Callable[[nn.Module], Callable[..., torch.Tensor]] = lambda model: F.mse_loss
    make_data: Callable[[], tuple[torch.Tensor, ...]] = lambda: (torch.randn(48, 8), torch.randn(48, 1))
    refused: str | None = None  # None: runs natively; else a pattern the fallback reason must match
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = lambda model: torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9
    )


# --- models -------------------------------------------------------------------------------------------


class SharedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.block = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.block(torch.tanh(self.block(h)))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


class Encoder(nn.Module):
    """Returns the hidden code; the loss decodes it with the encoder's own weight (tying in the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.tanh(self.enc(x))


class WithAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(8, 16, 1)
        self.aux = nn.Linear(1, 1)

    def forward(self, x):
        return self.body(x)


class InPlaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(8, 16, 1)

    def forward(self, x):
        x.mul_(2.0).add_(1.0)
        return self.body(x)


class BufferInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(8, 16, 1)
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        with torch.no_grad():
            self.seen += 1
            self.mean.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.body(x - self.mean)


class NonContiguous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(8, 1)

    def forward(self, x):  # x: [B, 8] viewed as [B, 8] -> transpose to mix over a second axis
        h = x.view(-1, 8, 1).expand(-1, 8, 6).transpose(1, 2)  # [B, 6, 8], non-contiguous
        h = self.mix(h.transpose(1, 2)).relu().transpose(1, 2)  # back and forth through transposes
        return self.out(h.mean(1))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h), h


class DictOut(TupleOut):
    def forward(self, x):
        pred, h = super().forward(x)
        return {"pred": pred, "hidden": h}


class IntAndBool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.dense = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x, ids, mask):
        h = self.dense(x) + self.emb(ids)
        return self.out(torch.relu(h) * mask.unsqueeze(1).to(h.dtype))


class Annealed(nn.Module):
    """Python state read in forward: a temperature annealed by a step counter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(8, 16, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.body(x) / (1.0 + 0.1 * self.calls)


class Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(8, 16, 1)
        self.last = None

    def forward(self, x):
        out = self.body(x)
        self.last = out.detach()
        return out


def frozen_in_group() -> nn.Module:
    model = mlp(8, 16, 1)
    model[0].bias.requires_grad_(False)
    return model


def with_hook(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = mlp(8, 16, 1)
        layer = model[0]
        if kind == "forward_pre":
            layer.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
        elif kind == "forward":
            layer.register_forward_hook(lambda m, args, out: out * 0.5)
        elif kind == "backward":  # on the last layer: the first one's input needs no gradient
            model[2].register_full_backward_hook(lambda m, gin, gout: (gin[0] * 0.5,))
        elif kind == "backward_pre":
            model[2].register_full_backward_pre_hook(lambda m, gout: (gout[0] * 0.5,))
        elif kind == "tensor":
            layer.weight.register_hook(lambda g: g * 0.5)
        elif kind == "post_accumulate":

            def halve(p: torch.Tensor) -> None:
                p.grad.mul_(0.5)

            layer.weight.register_post_accumulate_grad_hook(halve)
        return model

    return make


def parametrized(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = mlp(8, 16, 1)
        P = nn.utils.parametrizations
        if kind == "weight_norm":
            P.weight_norm(model[0])
        elif kind == "spectral_norm":
            P.spectral_norm(model[0])
        elif kind == "legacy_weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                nn.utils.weight_norm(model[0])
        else:
            model[0] = nn.Linear(8, 8)
            model[2] = nn.Linear(8, 1)
            P.orthogonal(model[0])
        return model

    return make


# --- losses -------------------------------------------------------------------------------------------


def l2_penalty(model: nn.Module):
    return lambda pred, y: F.mse_loss(pred, y) + 0.01 * sum((p**2).sum() for p in model.parameters())


def l1_through_attribute(model: nn.Module):
    return lambda pred, y: F.mse_loss(pred, y) + 0.01 * model[2].weight.abs().sum()


def reads_a_buffer(model: nn.Module):
    return lambda pred, y: F.mse_loss(pred, y) + 0.1 * (pred.mean() - model.mean.mean()) ** 2


def calls_a_submodule(model: nn.Module):
    return lambda pred, y: F.mse_loss(pred, y) + 0.1 * model.aux(pred).pow(2).mean()


def decodes_with_the_encoder(model: nn.Module):
    return lambda code, x: F.mse_loss(code @ model.enc.weight, x)


def kept_references(model: nn.Module):
    params = list(model.parameters())
    return lambda pred, y: F.mse_loss(pred, y) + 0.01 * sum((p**2).sum() for p in params)


def float64_loss(model: nn.Module):
    return lambda pred, y: F.mse_loss(pred.double(), y.double())


def tuple_loss(model: nn.Module):
    return lambda out, y: F.mse_loss(out[0], y) + 1e-3 * out[1].pow(2).mean()


def dict_loss(model: nn.Module):
    return lambda out, y: F.mse_loss(out["pred"], y) + 1e-3 * out["hidden"].pow(2).mean()


def counting_loss(model: nn.Module):
    state = {"calls": 0}

    def loss_fn(pred, y):
        state["calls"] += 1
        return F.mse_loss(pred, y)

    return loss_fn


def autoencoder_data() -> tuple[torch.Tensor, ...]:
    x = torch.randn(48, 8)
    return x, x


def int_and_bool_data() -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(48, 8),
        torch.randint(0, 10, (48,)),
        torch.rand(48) > 0.3,
        torch.randn(48, 1),
    )


def frozen_bias_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": list(model.parameters()), "lr": 0.05}], momentum=0.9
    )  # the frozen bias sits inside the group


CASES: dict[str, Case] = {
    "l2_penalty_over_parameters": Case(lambda: mlp(8, 16, 1), l2_penalty),
    "l1_penalty_through_an_attribute": Case(lambda: mlp(8, 16, 1), l1_through_attribute),
    "adam_with_l2_penalty": Case(
        lambda: mlp(8, 16, 1), l2_penalty, make_optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)
    ),
    "loss_reads_a_buffer": Case(BufferInForward, reads_a_buffer),
    "loss_calls_a_submodule": Case(WithAux, calls_a_submodule),
    "shared_submodule_called_twice": Case(SharedTwice),
    "weight_tying": Case(Tied),
    "weight_tying_in_the_loss": Case(Encoder, decodes_with_the_encoder, autoencoder_data),
    "in_place_ops_on_inputs": Case(InPlaceOnInput),
    "buffers_updated_in_forward": Case(BufferInForward),
    "non_contiguous_activations": Case(NonContiguous),
    "frozen_parameter_inside_a_param_group": Case(frozen_in_group, make_optimizer=frozen_bias_optimizer),
    "float64_loss_of_a_float32_model": Case(lambda: mlp(8, 16, 1), float64_loss),
    "model_returns_a_tuple": Case(TupleOut, tuple_loss),
    "model_returns_a_dict": Case(DictOut, dict_loss),
    "integer_and_bool_inputs": Case(IntAndBool, make_data=int_and_bool_data),
    "python_state_in_forward": Case(Annealed, refused=r"changes Python state .model attribute 'calls'"),
    "tensor_cached_in_forward": Case(Cached, refused=r"changes Python state .model attribute 'last'"),
    "loss_counts_its_calls": Case(
        lambda: mlp(8, 16, 1), counting_loss, refused=r"changes Python state .loss_fn's variable 'state'"
    ),
    "parameters_kept_from_before_fit": Case(
        lambda: mlp(8, 16, 1), kept_references, refused=r"reads the model's tensor '0.weight' other than"
    ),
    "forward_pre_hook": Case(with_hook("forward_pre"), refused=r"model module '0' has a forward pre-hook"),
    "forward_hook": Case(with_hook("forward"), refused=r"model module '0' has a forward hook"),
    "full_backward_hook": Case(with_hook("backward"), refused=r"model module '2' has a backward hook"),
    "full_backward_pre_hook": Case(with_hook("backward_pre"), refused=r"module '2' has a backward pre-hook"),
    "tensor_register_hook": Case(with_hook("tensor"), refused=r"'weight' has a gradient hook"),
    "post_accumulate_grad_hook": Case(
        with_hook("post_accumulate"), refused=r"'weight' has a post-accumulate-grad hook"
    ),
    "parametrization_weight_norm": Case(parametrized("weight_norm")),
    "parametrization_spectral_norm": Case(parametrized("spectral_norm")),
    "parametrization_orthogonal": Case(parametrized("orthogonal")),
    "legacy_weight_norm_hook": Case(
        parametrized("legacy_weight_norm"), refused=r"module '0' has a forward pre-hook \(WeightNorm\)"
    ),
    "torch_compiled_module": Case(
        lambda: torch.compile(mlp(8, 16, 1), backend="eager"),
        refused=r"pass the plain module .model._orig_mod",
    ),
}


def train_case(
    case: Case, engine: str | None, device: str = "cpu"
) -> tuple[nn.Module, list[float], list[warnings.WarningMessage]]:
    """Train a fresh model of ``case`` for two epochs: with the plain loop (``engine=None``) or fit()."""
    torch.manual_seed(0)
    data = tuple(t.to(device) for t in case.make_data())
    model = case.make_model().to(device)
    loss_fn = case.make_loss(model)
    optimizer = case.make_optimizer(model)
    generator = torch.Generator(device).manual_seed(7)
    torch.manual_seed(1)  # dropout and friends draw from here, in every run alike
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if engine is None:
            losses = plain_loop_losses(
                data, model, optimizer, loss_fn, batch_size=16, steps=6, generator=generator
            )
        else:
            stream = hotloop.fit(
                data, model, optimizer, loss_fn, batch_size=16, generator=generator, engine=engine
            )
            events = [next(stream), next(stream)]
            stream.close()
            assert {e["engine"] for e in events} == {events[0]["engine"]}
            losses = [e["train_loss"] for e in events]
            model.hotloop_engine = events[0]["engine"]  # type: ignore[assignment]
    return model, losses, list(caught)


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        scale = theirs.double().abs().max().item() if theirs.is_floating_point() and theirs.numel() else 0
        if theirs.is_floating_point():
            error = (ours.double() - theirs.double()).abs().max().item()
            assert error <= RTOL * scale + 1e-12, f"{name}: differs by {error:.3g} on a scale of {scale:.3g}"
        else:
            assert torch.equal(ours, theirs), name


def slow_path_reasons(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, hotloop.SlowPathWarning)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_engine_equals_the_plain_loop(name):
    case = CASES[name]
    reference, reference_losses, _ = train_case(case, None)
    model, losses, caught = train_case(case, "python")
    assert not slow_path_reasons(caught)  # asked for, so no warning
    assert_same_weights(model, reference)
    assert losses == pytest.approx(reference_losses, rel=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_auto_equals_the_plain_loop_or_says_why_not(name):
    case = CASES[name]
    reference, reference_losses, _ = train_case(case, None)
    model, losses, caught = train_case(case, "auto")
    reasons = slow_path_reasons(caught)
    if case.refused is None:
        assert model.hotloop_engine == "native", reasons
        assert not reasons
    else:
        assert model.hotloop_engine == "python"
        assert len(reasons) == 1 and re.search(case.refused, reasons[0]), reasons
    assert_same_weights(model, reference)
    assert losses == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.refused is not None))
def test_native_refuses_with_the_same_reason(name):
    case = CASES[name]
    model = case.make_model()
    stream = hotloop.fit(
        case.make_data(), model, case.make_optimizer(model), case.make_loss(model), engine="native"
    )
    with pytest.raises(RuntimeError, match=case.refused):
        next(stream)


def test_the_l2_reproduction_from_the_issue_trains_natively():
    """MLP 8-16-1, SGD lr 0.1, an L2 penalty over model.parameters(), one epoch: native equals python."""

    def run(engine: str) -> nn.Module:
        torch.manual_seed(0)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        model = mlp(8, 16, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss_fn(pred, target):
            return F.mse_loss(pred, target) + 0.1 * sum((p**2).sum() for p in model.parameters())

        stream = hotloop.fit(
            (x, y), model, optimizer, loss_fn, batch_size=16, generator=torch.Generator(), engine=engine
        )
        assert next(stream)["engine"] == engine
        stream.close()
        return model

    assert_same_weights(run("native"), run("python"))


@pytest.mark.parametrize("engine", ["python", "auto"])
def test_forward_runs_exactly_as_often_as_in_the_plain_loop(engine):
    torch.manual_seed(0)
    data = (torch.randn(48, 8), torch.randn(48, 1))
    model = Annealed()
    plain = copy.deepcopy(model)
    plain_loop_losses(
        data, plain, torch.optim.SGD(plain.parameters(), lr=0.05), F.mse_loss, batch_size=16, steps=6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hotloop.SlowPathWarning)
        stream = hotloop.fit(
            data,
            model,
            torch.optim.SGD(model.parameters(), lr=0.05),
            F.mse_loss,
            batch_size=16,
            engine=engine,
        )
        next(stream), next(stream)
    stream.close()
    assert model.calls == plain.calls == 6


def test_the_capture_check_leaves_the_training_data_untouched():
    """A forward that writes into its inputs must not write into train_data through the checks."""
    x, y = torch.randn(48, 8), torch.randn(48, 1)
    before = x.clone()
    model = InPlaceOnInput()
    stream = hotloop.fit(
        (x, y), model, torch.optim.SGD(model.parameters(), lr=0.05), F.mse_loss, batch_size=16, shuffle=True
    )
    assert next(stream)["engine"] == "native"
    stream.close()
    assert torch.equal(x, before)


def test_validation_loss_that_reads_the_model_follows_its_weights():
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randn(40, 1)
    model = mlp(8, 16, 1)
    penalised = l2_penalty(model)
    stage = hotloop.validation_loss((x, y), penalised, batch_size=16)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        got = stage({"model": model})["val_loss"]
        with torch.no_grad():
            expected = penalised(model(x), y).item()
        assert got == pytest.approx(expected, rel=1e-5)


def test_ddp_model_trains_natively_with_its_collectives_in_the_graph(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        data = (torch.randn(48, 8), torch.randn(48, 1))
        model = nn.parallel.DistributedDataParallel(mlp(8, 16, 1))
        reference = copy.deepcopy(model)
        reference_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
        generator = torch.Generator().manual_seed(3)
        plain_loop_losses(
            data, reference, reference_opt, F.mse_loss, batch_size=16, steps=3, generator=generator
        )
        generator.manual_seed(3)
        # one rank: DistributedSampler's epoch 0 is randperm from a generator seeded `seed`
        stream = hotloop.fit(
            data, model, torch.optim.SGD(model.parameters(), lr=0.05), F.mse_loss, batch_size=16, seed=3
        )
        assert next(stream)["engine"] == "native"
        stream.close()
        assert_same_weights(model, reference)
    finally:
        dist.destroy_process_group()


def test_a_global_module_hook_is_refused():
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        model = mlp(8, 16, 1)
        data = (torch.randn(32, 8), torch.randn(32, 1))
        stream = hotloop.fit(
            data, model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss, engine="native"
        )
        with pytest.raises(RuntimeError, match="global module hooks are registered .forward hook."):
            next(stream)
    finally:
        handle.remove()


class Tempered(nn.Module):
    """Python state read (not written) in forward, annealed by the user between events."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp(8, 16, 1)
        self.temperature = 1.0

    def forward(self, x):
        return self.body(x) / self.temperature


def test_python_state_changed_between_events_is_captured_again():
    torch.manual_seed(0)
    data = (torch.randn(48, 8), torch.randn(48, 1))
    model = Tempered()
    plain = copy.deepcopy(model)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(5)
    for temperature in (1.0, 2.0, 4.0):
        plain.temperature = temperature
        plain_loop_losses(
            data, plain, plain_optimizer, F.mse_loss, batch_size=16, steps=3, generator=generator
        )
    generator.manual_seed(5)
    stream = hotloop.fit(
        data,
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        F.mse_loss,
        batch_size=16,
        generator=generator,
    )
    for temperature in (1.0, 2.0, 4.0):
        model.temperature = temperature
        assert next(stream)["engine"] == "native"
    stream.close()
    assert_same_weights(model, plain)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_native_optimizer_steps_bitwise_as_the_users_optimizer(kind, fused):
    """The native step uses the fused kernels only when the user's optimizer does: either way bitwise."""
    options = {"lr": 0.05, "fused": fused} | ({"momentum": 0.9} if kind is torch.optim.SGD else {})
    torch.manual_seed(0)
    data = (torch.randn(96, 8), torch.randn(96, 1))
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    plain = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    plain_loop_losses(
        data,
        plain,
        kind(plain.parameters(), **options),
        F.mse_loss,
        batch_size=16,
        steps=12,
        generator=generator,
    )
    generator.manual_seed(2)
    stream = hotloop.fit(
        data,
        model,
        kind(model.parameters(), **options),
        F.mse_loss,
        batch_size=16,
        generator=generator,
        engine="native",
    )
    next(stream), next(stream)
    stream.close()
    for (name, ours), theirs in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
