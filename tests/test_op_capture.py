"""Capture for the native engine: traced joint graphs, their lowering to _C.OpGraph, and the eager check."""

from __future__ import annotations

import copy

import pytest
import torch
from hotloop import op_capture as capture
from hotloop.op_capture import CaptureError
from torch import nn


def run_lowered(model, loss_fn, batch, *, last_label=True, metrics=()):
    """Capture `model` for `batch`, run the lowered graph on copies: (grads, loss, metrics, state after)."""
    gm = capture.trace_step(model, loss_fn, batch, last_label=last_label, metrics=metrics)
    _, params, _, state = capture._split_parameters(model)
    graph = capture.lower(gm, len(params) + len(state) + len(batch))
    state = [t.detach().clone() for t in state]
    outputs = graph([p.detach().clone() for p in params] + state + list(batch))
    n = len(params)
    return outputs[:n], outputs[n], outputs[n + 1 :], state, graph


def eager_step(model, loss_fn, batch, *, last_label=True):
    twin = copy.deepcopy(model).train()
    if last_label:
        *inputs, labels = batch
        loss = loss_fn(twin(*inputs), labels)
    else:
        loss = loss_fn(twin(*batch))
    loss.backward()
    grads = [p.grad for p in twin.parameters() if p.requires_grad]
    state = [p.detach() for p in twin.parameters() if not p.requires_grad] + list(twin.buffers())
    return grads, loss.detach(), state


class Blocks(nn.Module):
    """Ops whose lowering needs tensor lists, optional-tensor lists and multi-output unpacking."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a, b = x.split(3, dim=1)  # Tensor[] return, unpacked
        h = torch.cat([a * 2, b, self.embed(ids)], dim=1)  # Tensor[] argument
        h = h[:, torch.tensor([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])]  # Tensor?[] argument
        return self.head(torch.tanh(self.norm(h))).log_softmax(-1)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class CountingBranch(nn.Module):
    """Python state in forward: odd calls double the input. Tracing freezes one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x * 2 if self.calls % 2 else x)


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


CASES = {
    "mlp": lambda: (
        nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1)),
        nn.MSELoss(),
        (torch.randn(10, 8), torch.randn(10, 1)),
    ),
    "blocks": lambda: (
        Blocks(),
        nn.functional.nll_loss,
        (torch.randn(10, 6), torch.randint(0, 12, (10,)), torch.randint(0, 3, (10,))),
    ),
    "conv": lambda: (ConvNet(), nn.CrossEntropyLoss(), (torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowered_graph_matches_eager_autograd(case):
    torch.manual_seed(0)
    model, loss_fn, batch = CASES[case]()
    grads, loss, _, state, _ = run_lowered(model, loss_fn, batch)
    ref_grads, ref_loss, ref_state = eager_step(model, loss_fn, batch)
    torch.testing.assert_close(loss, ref_loss.reshape(()), rtol=1e-6, atol=1e-7)
    assert len(grads) == len(ref_grads)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
    for value, ref in zip(state, ref_state, strict=True):  # BatchNorm running stats and num_batches_tracked
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-7)


def test_tracing_has_no_side_effects():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 1))
    batch = (torch.randn(10, 8), torch.randn(10, 1))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    capture.capture_step(model, nn.MSELoss(), [batch], last_label=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_mlp_with_batchnorm_is_a_short_op_list():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    *_, graph = run_lowered(model, nn.MSELoss(), (torch.randn(10, 8), torch.randn(10, 1)))
    names = graph.op_names
    assert len(names) <= 34
    assert "aten::add_.Tensor" in names  # num_batches_tracked += 1 survives dead-code elimination
    assert not any(name.startswith("aten::detach") for name in names)


def test_loss_as_plain_function_and_without_labels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6))

    def loss_fn(reconstruction):
        return reconstruction.pow(2).mean()

    batch = (torch.randn(7, 6),)
    grads, loss, _, _, _ = run_lowered(model, loss_fn, batch, last_label=False)
    ref_grads, ref_loss, _ = eager_step(model, loss_fn, batch, last_label=False)
    torch.testing.assert_close(loss, ref_loss)
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref)


def test_frozen_parameters_are_inputs_not_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    batch = (torch.randn(5, 4), torch.randn(5, 1))
    grads, _, _, _, _ = run_lowered(model, nn.MSELoss(), batch)
    assert [g.shape for g in grads] == [p.shape for p in model.parameters() if p.requires_grad]


def test_train_metrics_are_extra_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    batch = (torch.randn(9, 4), torch.randint(0, 3, (9,)))

    def accuracy(pred, labels):
        return (pred.argmax(1) == labels).float().mean()

    _, _, metrics, _, _ = run_lowered(model, nn.CrossEntropyLoss(), batch, metrics=[accuracy])
    assert metrics[0].item() == pytest.approx(accuracy(model(batch[0]), batch[1]).item())


def test_data_dependent_control_flow_is_a_capture_error():
    with pytest.raises(CaptureError, match="data-dependent"):
        capture.capture_step(
            DataBranch(), nn.MSELoss(), [(torch.randn(5, 4), torch.randn(5, 1))], last_label=True
        )


def test_python_state_in_forward_is_caught_by_the_eager_check():
    with pytest.raises(CaptureError, match="changes Python state .model attribute .calls."):
        capture.capture_step(
            CountingBranch(), nn.MSELoss(), [(torch.randn(5, 4), torch.randn(5, 1))], last_label=True
        )


def test_loss_reading_values_in_python_is_a_capture_error():
    def loss_fn(pred, target):
        return (pred - target).pow(2).mean() * (1.0 if float(target.mean()) > 0 else 2.0)

    with pytest.raises(CaptureError):
        capture.capture_step(
            nn.Linear(4, 1), loss_fn, [(torch.randn(5, 4), torch.randn(5, 1))], last_label=True
        )


def test_unused_parameter_is_a_capture_error_naming_it():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 1)
            self.spare = nn.Linear(4, 1)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(CaptureError, match="spare.weight"):
        capture.capture_step(
            Unused(), nn.MSELoss(), [(torch.randn(5, 4), torch.randn(5, 1))], last_label=True
        )


def test_non_scalar_loss_is_a_capture_error():
    with pytest.raises(CaptureError, match="single value"):
        capture.capture_step(
            nn.Linear(4, 2),
            lambda pred, y: (pred - y).pow(2),
            [(torch.randn(5, 4), torch.randn(5, 2))],
            last_label=True,
        )


def test_one_graph_per_batch_size():
    x, y = torch.randn(10, 4), torch.randn(10, 1)
    captured = capture.capture_step(
        nn.Linear(4, 1), nn.MSELoss(), [(x[:4], y[:4]), (x[:2], y[:2]), (x[4:8], y[4:8])], last_label=True
    )
    assert sorted(captured.graphs) == [2, 4]


def test_tensor_constants_in_loss_and_model_are_the_users_tensors():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.scale = torch.tensor([1.0, 2.0, 3.0])  # a plain attribute, neither parameter nor buffer

        def forward(self, x):
            return self.linear(x) * self.scale

    torch.manual_seed(0)
    model = Scaled()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    captured = capture.capture_step(model, loss_fn, [batch], last_label=True)
    graph = captured.graphs[6]
    inputs = [p.detach() for p in captured.params] + list(batch)
    before = graph(inputs)[-1]
    model.scale.mul_(2)  # later in-place changes are seen: the graph holds the tensor, not a copy
    after = graph(inputs)[-1]
    assert not torch.equal(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, loss_fn(model(batch[0]), batch[1]))


def test_outputs_that_view_an_input_come_back_as_copies():
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda x: (x.t(), x + 1, x))(torch.randn(3, 2))
    graph = capture.lower(gm, 1)
    x = torch.randn(3, 2)
    viewed, fresh, same = graph([x])
    torch.testing.assert_close(viewed, x.t())
    torch.testing.assert_close(same, x)
    assert viewed.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert same.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    torch.testing.assert_close(fresh, x + 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ops_inside_the_graph_reuse_their_outputs_and_runs_stay_independent(case):
    """Ops whose result stays inside the graph write into the tensor their first run returned; every run
    still equals the first bitwise, and no returned tensor is one a later run writes into."""
    torch.manual_seed(0)
    model, loss_fn, batch = CASES[case]()
    grads, loss, _, _, graph = run_lowered(model, loss_fn, batch)
    assert graph.reused_ops  # e.g. addmm, relu, mm, threshold_backward
    assert not {"aten::t.", "aten::reshape."} & set(graph.reused_ops)  # views never
    _, params, _, state = capture._split_parameters(model)

    def run(batch):
        inputs = [p.detach().clone() for p in params] + [t.detach().clone() for t in state] + list(batch)
        return graph(inputs)

    first = run(batch)
    kept = [t.clone() for t in first]
    other = [t.flip(0) for t in batch]
    run(other)
    again = run(batch)
    for a, b, c in zip(first, kept, again, strict=True):
        assert torch.equal(a, b)  # not overwritten by the later runs
        assert torch.equal(a, c)  # the reused outputs give the same results
        assert a.data_ptr() != c.data_ptr() or a.numel() == 0


def test_out_variant_is_found_only_for_fresh_single_outputs():
    aten = torch.ops.aten
    assert capture._out_overload(aten.addmm.default) == "out"
    assert capture._out_overload(aten.threshold_backward.default) == "grad_input"
    assert capture._out_overload(aten.sum.dim_IntList) == "IntList_out"
    assert capture._out_overload(aten.t.default) is None  # a view
    assert capture._out_overload(aten.add_.Tensor) is None  # writes its input
    assert capture._out_overload(aten.bernoulli.p) is None  # draws random numbers
    assert capture._out_overload(aten.native_batch_norm.default) is None  # several outputs


def test_reuse_output_refuses_an_overload_that_is_not_the_out_variant():
    model, loss_fn, batch = CASES["mlp"]()
    *_, graph = run_lowered(model, loss_fn, batch)
    index = graph.op_names.index("aten::addmm.")
    with pytest.raises(RuntimeError, match="does not take"):
        graph.reuse_output(index, "")
    with pytest.raises(RuntimeError, match="out of range"):
        graph.reuse_output(len(graph.op_names), "out")
