"""Capture for the native engine: model + loss as one joint forward+backward ATen graph, lowered to ops.

``capture_step`` traces ``torch.func.grad_and_value`` over ``torch.func.functional_call`` with ``make_fx`` on
fake tensors (so tracing has no side effects and data-dependent control flow fails loudly), lowers the
graph to a ``_C.OpGraph`` that C++ runs through the dispatcher, and checks it against an eager autograd
step on a real batch before anyone trains with it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.func import grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx

from . import distributed, layouts
from ._native import _C
from ._shared import CaptureError, forward_and_loss, named_tensors, traced_scalar_loss
from .clipping import GradClip
from .eager_draws import draw_as_eager
from .faster_ops import swap_for_faster
from .fidelity import UserState, refusal_reason, reparametrized, stateful_reason


@dataclass
class CapturedStep:
    """What the native engine trains with: the user's tensors, in the order the graphs take them."""

    param_names: list[str]  # trainable parameters: graph inputs first, gradients come out in this order
    params: list[torch.Tensor]
    state_names: list[str]  # frozen parameters and buffers: graph inputs after the params, updated in place
    state: list[torch.Tensor]
    graphs: dict[int, Any] = field(default_factory=dict)  # batch size -> _C.OpGraph
    num_batch_inputs: int = 0
    largest_tensor: int = 0  # elements of the largest tensor any graph reads or makes

    def refresh(self, model: nn.Module) -> bool:
        """Follow tensors the model replaced since capture (``module.weight = ...``, ``load_state_dict(...,
        assign=True)``): True when the lists changed and must be bound again. Raises CaptureError when the
        graphs no longer fit the model (a tensor appeared or vanished, became frozen or trainable, or
        changed shape, dtype or device)."""
        train_names, train, state_names, state = _split_parameters(model)
        if train_names != self.param_names or state_names != self.state_names:
            changed = sorted(set(train_names) ^ set(self.param_names)) or sorted(
                set(state_names) ^ set(self.state_names)
            )
            raise CaptureError(
                "the model's trainable parameters or buffers changed since the step was captured "
                f"({', '.join(changed) or 'their order'}); start a new fit() to capture it again"
            )
        replaced = False
        for names, old, new in ((train_names, self.params, train), (state_names, self.state, state)):
            for name, before, now in zip(names, old, new, strict=True):
                if now is before:
                    continue
                if (now.shape, now.dtype, now.device) != (before.shape, before.dtype, before.device):
                    raise CaptureError(
                        f"'{name}' was replaced by a tensor of another shape, dtype or device since the step "
                        "was captured; start a new fit() to capture it again"
                    )
                replaced = True
        if replaced:
            self.params, self.state = train, state
        return replaced


@dataclass(frozen=True)
class Gradients:
    """How a step's gradients are formed before the optimizer steps: ``accumulate`` micro-batches of
    ``micro_batch`` samples (the step's batch split along its first dimension), each backpropagating its
    loss divided by ``accumulate`` and summed in order, as a plain loop calling ``(loss / k).backward()``
    k times does; then ``clip`` on the gradients of ``clipped`` (the optimizer's parameters, its order)."""

    accumulate: int = 1
    micro_batch: int = 0
    clip: GradClip | None = None
    clipped: tuple[torch.Tensor, ...] = ()

    def split(self, batch: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        if self.accumulate == 1:
            return [tuple(batch)]
        return list(zip(*(t.split(self.micro_batch) for t in batch), strict=True))


# Ops without a schema-declared mutation that still write into an argument (running statistics).
_HIDDEN_MUTATION = ("batch_norm",)


def _split_parameters(
    model: nn.Module,
) -> tuple[list[str], list[torch.Tensor], list[str], list[torch.Tensor]]:
    parameters = {id(p) for p in model.parameters()}
    tensors = named_tensors(model)
    trainable = [(n, t) for n, t in tensors if id(t) in parameters and t.requires_grad]
    state = [(n, t) for n, t in tensors if not (id(t) in parameters and t.requires_grad)]
    return [n for n, _ in trainable], [t for _, t in trainable], [n for n, _ in state], [t for _, t in state]


def _joint_step(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    last_label: bool,
    train_names: Sequence[str],
    state_names: Sequence[str],
    metrics: Sequence[Callable[..., Any]] = (),
    gradients: Gradients = Gradients(),
    clipped: Sequence[int] = (),
    channels_last: bool = False,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``(params, state, *batch) -> (*grads, loss, *metrics)``: a training step's maths without the update.

    Gradients are accumulated over ``gradients``' micro-batches (the loss and metrics are their
    sample-weighted means), then clipped at the positions ``clipped`` (in the optimizer's order) as
    ``clip_grad_norm_``/``clip_grad_value_`` would between backward and step; a non-finite norm under
    ``error_if_nonfinite`` turns the loss into NaN, so the non-finite guard refuses the step. With
    ``channels_last`` forward reads channels_last copies of the 4-D trainable parameters and batch
    inputs (the same values; convolutions then run in that layout), and gradients flow back to the
    parameters themselves."""
    clip, k = gradients.clip, gradients.accumulate

    def loss_of(params: list[torch.Tensor], state: list[torch.Tensor], batch: tuple[torch.Tensor, ...]):
        if channels_last:
            params = [layouts.to_channels_last(p, copy=True) for p in params]
            batch = tuple(layouts.to_channels_last(t, copy=False) for t in batch)
        tensors = dict(zip(train_names, params, strict=True))
        tensors.update(zip(state_names, state, strict=True))
        # Forward and loss under one reparametrisation: a loss that reads the model's tensors (an L2
        # penalty over model.parameters(), a tied weight) reads graph inputs, so its gradient is kept.
        with reparametrized(model, tensors):
            pred, labels, loss = forward_and_loss(model, loss_fn, batch, last_label)
        aux = (
            (torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, pred), labels)
            if metrics
            else ()
        )
        return traced_scalar_loss(loss), aux

    def metric_values(aux: Any) -> list[torch.Tensor]:
        values = []
        for i, metric in enumerate(metrics):
            value = metric(*aux) if last_label else metric(aux[0])
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise CaptureError(
                    f"train metric {i} must return a single-element tensor for the native engine"
                )
            values.append(value.detach().reshape(()))
        return values

    def scaled_loss_of(
        params: list[torch.Tensor], state: list[torch.Tensor], batch: tuple[torch.Tensor, ...]
    ):
        loss, aux = loss_of(params, state, batch)
        return loss / k, (loss, aux)

    def accumulated(params: list[torch.Tensor], state: list[torch.Tensor], batch: tuple[torch.Tensor, ...]):
        grads: list[torch.Tensor] = []
        loss_sum, value_sums = None, []
        for micro in gradients.split(batch):
            more, (_, (loss, aux)) = grad_and_value(scaled_loss_of, has_aux=True)(params, state, micro)
            count, values = micro[0].shape[0], metric_values(aux)
            if loss_sum is None:
                grads, loss_sum, value_sums = list(more), loss * count, [v * count for v in values]
            else:
                grads = [a + b for a, b in zip(grads, more, strict=True)]
                loss_sum = loss_sum + loss * count
                value_sums = [a + v * count for a, v in zip(value_sums, values, strict=True)]
        total = batch[0].shape[0]
        return grads, loss_sum / total, [v / total for v in value_sums]

    def joint(params: list[torch.Tensor], state: list[torch.Tensor], *batch: torch.Tensor):
        if k == 1:
            grads, (loss, aux) = grad_and_value(loss_of, has_aux=True)(params, state, batch)
            values = metric_values(aux)
        else:
            grads, loss, values = accumulated(params, state, batch)
        if clip is not None:
            grads = list(grads)
            picked, finite = clip.traced([grads[i] for i in clipped])
            for i, grad in zip(clipped, picked, strict=True):
                grads[i] = grad
            if finite is not None:
                loss = torch.where(finite, loss, float("nan"))
        return (*grads, loss, *values)

    return joint


def trace_step(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
    *,
    last_label: bool,
    metrics: Sequence[Callable[..., Any]] = (),
    gradients: Gradients = Gradients(),
    data_parallel: distributed.Distributed | None = None,
    channels_last: bool = False,
) -> fx.GraphModule:
    """The joint forward+backward graph of one training step on batches shaped like ``batch``.

    Placeholders are the trainable parameters, then frozen parameters and buffers, then the batch
    tensors; outputs are the gradient of each trainable parameter (accumulated and clipped as
    ``gradients`` says), the loss, then each train metric. With ``data_parallel`` (``model`` is the DDP
    wrapper's module) DDP's collectives are traced in. With ``channels_last`` the graph runs its 4-D
    tensors in that layout (its inputs and gradients keep the user's layout).
    """
    train_names, train, state_names, state = _split_parameters(model)
    position = {id(t): i for i, t in enumerate(train)}
    indices = [position[id(p)] for p in gradients.clipped if id(p) in position]
    joint = _joint_step(
        model, loss_fn, last_label, train_names, state_names, metrics, gradients, indices, channels_last
    )
    if data_parallel is not None:
        buffers = {name for name, _ in model.named_buffers()}
        positions = [i for i, name in enumerate(state_names) if name in buffers]
        joint = distributed.synced(data_parallel, joint, positions)
    was_training = model.training
    model.train()
    try:
        traced = make_fx(joint, tracing_mode="fake", _allow_non_fake_inputs=True)
        gm = traced(list(train), list(state), *batch)
        if channels_last:
            layouts.match_layouts(gm)
        return gm
    except CaptureError:
        raise
    except Exception as exc:  # any tracing failure is a reason to fall back, reported verbatim
        raise CaptureError(_describe_trace_failure(exc)) from exc
    finally:
        model.train(was_training)


def _describe_trace_failure(exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    name = type(exc).__name__
    if "data-dependent" in str(exc) or "DataDependent" in name:
        return (
            "forward or loss_fn has data-dependent Python control flow or reads tensor values in Python "
            f"({name}: {first_line})"
        )
    return f"tracing failed ({name}: {first_line})"


def _eliminate_dead_code(graph: fx.Graph) -> list[fx.Node]:
    """Nodes that matter, in order: outputs, their inputs, ops that write memory or draw random numbers."""
    live: set[fx.Node] = set()
    nodes = list(graph.nodes)
    for node in reversed(nodes):
        keep = node.op in ("output", "placeholder") or any(user in live for user in node.users)
        if not keep and node.op == "call_function":
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                keep = node.is_impure() or any(word in target._schema.name for word in _HIDDEN_MUTATION)
            elif target is not operator.getitem:
                keep = True  # unknown: lowering will reject it with a clear message
        if keep:
            live.add(node)
    return [node for node in nodes if node in live]


def _is_tensor_type(arg_type: torch._C.JitType) -> bool:
    text = str(arg_type)
    return text in ("Tensor", "Optional[Tensor]")


def _normalise(target: torch._ops.OpOverload, node: fx.Node) -> list[Any]:
    """The node's arguments in the schema's order, with fx.Node where a value flows in and _DEFAULT where
    the schema's default applies."""
    schema = target._schema
    values: list[Any] = []
    for i, formal in enumerate(schema.arguments):
        if i < len(node.args) and not formal.kwarg_only:
            values.append(node.args[i])
        elif formal.name in node.kwargs:
            values.append(node.kwargs[formal.name])
        elif formal.has_default_value():
            values.append(_DEFAULT)
        else:
            raise CaptureError(f"{target}: argument '{formal.name}' is missing in the captured graph")
    extra = set(node.kwargs) - {formal.name for formal in schema.arguments}
    if len(node.args) > len(schema.arguments) or extra:
        raise CaptureError(f"{target}: the captured call does not match its schema {schema}")
    return values


_DEFAULT = object()
# Ops whose result stays inside the graph write into the tensor their first run returned (out= variants),
# instead of allocating one per step. A switch so that bench/quick_wins.py can measure it. Only small
# results: allocating costs about as much as a small kernel, nothing next to a large one, and kept
# results stay alive between steps where eager would free them.
REUSE_OUTPUTS = True
REUSE_AT_MOST = 1 << 15  # elements


_aten = torch.ops.aten
# Factories whose result depends only on constants and input metadata: computed once at capture when
# nothing writes to the result.
_CONSTANT_FACTORIES = {
    _aten.ones_like.default,
    _aten.zeros_like.default,
    _aten.full_like.default,
    _aten.empty_like.default,
    _aten.empty.memory_format,
    _aten.zeros.default,
    _aten.ones.default,
    _aten.full.default,
    _aten.scalar_tensor.default,
}


def _layout(value: Any) -> tuple[Any, ...] | None:
    if not isinstance(value, torch.Tensor):
        return None
    return (value.shape, value.stride(), value.storage_offset(), value.dtype, value.device)


def _simplify(gm: fx.GraphModule) -> None:
    """Per-step work the graph does not need: view ops whose result is laid out exactly like a tensor they
    view (``t(t(w))``, ``view(x, x.shape)``) become that tensor, and constant factories that nothing writes
    (the ``ones_like`` that seeds the backward pass) become constants. Dead nodes are left for DCE."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        target = node.target
        if target.is_view and len(target._schema.returns) == 1 and node.args:
            layout = _layout(node.meta.get("val"))
            source = node.args[0]
            while layout is not None and isinstance(source, fx.Node):
                if _layout(source.meta.get("val")) == layout:
                    node.replace_all_uses_with(source)
                    break
                viewed = source.op == "call_function" and isinstance(source.target, torch._ops.OpOverload)
                if not (viewed and source.target.is_view and source.args):
                    break
                source = source.args[0]
        elif target in _CONSTANT_FACTORIES and not _may_be_written(node):
            value = _evaluate_factory(node)
            if value is None:
                continue
            name = f"_hotloop_constant_{len([n for n in graph.nodes if n.op == 'get_attr'])}"
            gm.register_buffer(name, value, persistent=False)
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            constant.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(constant)


def _may_be_written(node: fx.Node) -> bool:
    """Whether an op may write into ``node``'s value, directly or through a view, or it leaves the graph."""
    for user in node.users:
        if user.op != "call_function" or not isinstance(user.target, torch._ops.OpOverload):
            return True  # an output (grads may be updated in place) or something unknown
        schema = user.target._schema
        if any(word in schema.name for word in _HIDDEN_MUTATION):
            return True
        for formal, value in zip(schema.arguments, _normalise(user.target, user), strict=True):
            used = value is node or (isinstance(value, (list, tuple)) and any(v is node for v in value))
            if not used or formal.alias_info is None:
                continue
            if formal.alias_info.is_write or (user.target.is_view and _may_be_written(user)):
                return True
            if not user.target.is_view:
                return True  # aliases its input without being a view: be conservative
    return False


def _evaluate_factory(node: fx.Node) -> torch.Tensor | None:
    expected = node.meta.get("val")
    if _layout(expected) is None:
        return None

    def real(value: Any) -> Any:
        if isinstance(value, fx.Node):
            meta = value.meta.get("val")
            if _layout(meta) is None:
                raise CaptureError("unknown input layout")
            return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device)
        return value

    try:
        args = [real(a) for a in node.args]
        kwargs = {k: real(v) for k, v in node.kwargs.items()}
        value = node.target(*args, **kwargs)
    except Exception:
        return None
    if node.target in (_aten.empty.memory_format, _aten.empty_like.default):
        value.zero_()  # any contents are valid; keep them reproducible
    return value if _layout(value) == _layout(expected) else None


def _aliases_input(node: fx.Node) -> bool:
    """Whether ``node``'s value may share memory with a graph input or constant (a chain of views of one)."""
    while True:
        if node.op in ("placeholder", "get_attr"):
            return True
        if node.op != "call_function":
            return True
        target = node.target
        if target is operator.getitem:
            node = node.args[0]
            continue
        if not isinstance(target, torch._ops.OpOverload):
            return True
        if not target.is_view:
            return False
        node = node.args[0]


def lower(gm: fx.GraphModule, num_inputs: int, *, protected: dict[str, torch.Tensor] | None = None) -> Any:
    """Lower a traced graph to a ``_C.OpGraph``: inputs are the placeholders in order, outputs the flattened
    outputs. Raises CaptureError for anything that is not a plain ATen op call, and for a tensor constant
    that is, or shares memory with, one of the ``protected`` tensors (the model's parameters and buffers):
    baked in, it would never change, and its gradient would be dropped."""
    try:
        return _lower(gm, num_inputs, protected or {})
    except CaptureError:
        raise
    except Exception as exc:  # an op or graph shape the lowering does not know: fall back, saying so
        raise CaptureError(f"lowering the captured graph failed ({type(exc).__name__}: {exc})") from exc


def _lower(gm: fx.GraphModule, num_inputs: int, protected: dict[str, torch.Tensor]) -> Any:
    _refuse_baked_in(gm, protected)
    draw_as_eager(gm)
    swap_for_faster(gm)
    _simplify(gm)
    nodes = _eliminate_dead_code(gm.graph)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != num_inputs:
        raise CaptureError(f"the captured graph takes {len(placeholders)} inputs, expected {num_inputs}")
    slots = _Slots(placeholders)
    for node in nodes:
        if node.op == "get_attr":
            slots.add_constant(node, getattr(gm, node.target))
        elif node.op == "output":
            slots.add_outputs(node)
        elif node.op == "call_function" and node.target is operator.getitem:
            slots.add_getitem(node)
        elif node.op == "call_function":
            slots.add_call(node)
        elif node.op != "placeholder":
            raise CaptureError(f"unsupported graph node {node.op} {node.target}")
    return slots.build(num_inputs)


class _Slots:
    """The value slots of an OpGraph being lowered: inputs first, then constants and op results in order."""

    def __init__(self, placeholders: list[fx.Node]) -> None:
        self.slot: dict[fx.Node, int] = {node: i for i, node in enumerate(placeholders)}
        self.results_of: dict[fx.Node, list[int]] = {}  # multi-output node -> slot per output
        self.constants: list[tuple[int, torch.Tensor]] = []
        self.ops: list[dict[str, Any]] = []
        self.outputs: list[int] = []
        self.output_nodes: list[fx.Node] = []
        self.count = len(placeholders)

    def new(self, count: int) -> list[int]:
        slots = list(range(self.count, self.count + count))
        self.count += count
        return slots

    def add_constant(self, node: fx.Node, value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"the captured graph holds a constant of type {type(value).__name__}")
        (self.slot[node],) = self.new(1)
        self.constants.append((self.slot[node], value))

    def add_outputs(self, node: fx.Node) -> None:
        for value in torch.utils._pytree.tree_leaves(node.args[0]):
            if not isinstance(value, fx.Node) or value not in self.slot:
                raise CaptureError(f"graph output {value!r} is not a tensor computed by the graph")
            self.outputs.append(self.slot[value])
            self.output_nodes.append(value)

    def add_getitem(self, node: fx.Node) -> None:
        parent, index = node.args
        if parent not in self.results_of:
            raise CaptureError(f"getitem on a value that is not a multi-output op result: {parent}")
        self.slot[node] = self.results_of[parent][index]

    def add_call(self, node: fx.Node) -> None:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            raise CaptureError(f"unsupported operation in the captured graph: {target}")
        schema = target._schema
        args = [
            _encode_argument(target, formal, value, self.slot)
            for formal, value in zip(schema.arguments, _normalise(target, node), strict=True)
        ]
        val = node.meta.get("val")
        returns = schema.returns
        unpacked = -1
        if len(returns) == 1 and str(returns[0].type) == "List[Tensor]":
            if not isinstance(val, (list, tuple)):
                raise CaptureError(f"{target}: unknown number of returned tensors")
            unpacked = len(val)
            results = self.results_of[node] = self.new(unpacked)
            op_results = [results[0] if results else -1]
        elif len(returns) == 1:
            if not _is_tensor_type(returns[0].type):
                raise CaptureError(f"{target} returns {returns[0].type}, not a tensor")
            (self.slot[node],) = self.new(1)
            op_results = [self.slot[node]]
        else:
            op_results = self.results_of[node] = self.new(len(returns))
        name, overload = schema.name, schema.overload_name
        if target is _aten.view.default:
            # Fake tensors can predict a layout the real kernel does not give (mse_loss_backward's is
            # contiguous where its meta follows the input's), and a view of it then fails; reshape is that
            # same view wherever one is possible and a copy only where the view would have failed.
            name, overload = "aten::reshape", ""
        self.ops.append(
            {
                "node": node,
                "name": name,
                "overload": overload,
                "args": args,
                "results": op_results,
                "unpacked": unpacked,
            }
        )

    def releases(self, num_inputs: int) -> dict[int, list[int]]:
        """Op index -> the slots to free after it: each intermediate after its last reader, and results
        nobody reads right after they are written."""
        pinned = set(range(num_inputs)) | {s for s, _ in self.constants} | set(self.outputs)
        last_reader: dict[int, int] = {}
        for index, op in enumerate(self.ops):
            for kind, *payload in op["args"]:
                if kind == "slot":
                    last_reader[payload[0]] = index
                elif kind == "list":
                    for s in payload[0]:
                        if s is not None:
                            last_reader[s] = index
        for index, op in enumerate(self.ops):
            written = op["results"] if op["unpacked"] < 0 else _unpacked_slots(op)
            for s in written:
                if s >= 0 and s not in pinned and s not in last_reader:
                    last_reader[s] = index
        release: dict[int, list[int]] = {}
        for s, index in last_reader.items():
            if s not in pinned:
                release.setdefault(index, []).append(s)
        return release

    def build(self, num_inputs: int) -> Any:
        release = self.releases(num_inputs)
        graph = _C.OpGraph(num_inputs)
        graph.reserve_slots(self.count)
        for s, value in self.constants:
            graph.set_constant(s, value)
        for index, op in enumerate(self.ops):
            try:
                freed = release.get(index, [])
                graph.add_op(op["name"], op["overload"], op["args"], op["results"], freed, op["unpacked"])
            except Exception as exc:
                raise CaptureError(f"cannot lower {op['node'].target}: {exc}") from exc
        graph.set_outputs(self.outputs, [_aliases_input(node) for node in self.output_nodes])
        escaping = _escaping(self.output_nodes) if REUSE_OUTPUTS else set(op["node"] for op in self.ops)
        for index, op in enumerate(self.ops):
            node, value = op["node"], op["node"].meta.get("val")
            small = isinstance(value, torch.Tensor) and value.numel() <= REUSE_AT_MOST
            out = _out_overload(node.target) if small and node not in escaping else None
            if out is not None and op["unpacked"] < 0:
                graph.reuse_output(index, out)
        return graph


def _escaping(outputs: Sequence[fx.Node]) -> set[fx.Node]:
    """The nodes whose value is, or may share memory with, one of the graph's outputs: the outputs and
    what they view or alias, transitively."""
    seen: set[fx.Node] = set()
    pending = list(outputs)
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op != "call_function":
            continue
        target = node.target
        if target is operator.getitem:
            pending.append(node.args[0])
        elif not isinstance(target, torch._ops.OpOverload) or any(
            r.alias_info is not None for r in target._schema.returns
        ):
            leaves = torch.utils._pytree.tree_leaves((node.args, node.kwargs))
            pending.extend(v for v in leaves if isinstance(v, fx.Node))
    return seen


def _out_overload(target: Any) -> str | None:
    """The overload of ``target``'s out= variant taking its arguments then one output tensor, when
    ``target`` returns one fresh tensor, writes none of its arguments and draws no random numbers."""
    if not isinstance(target, torch._ops.OpOverload) or target.is_view:
        return None
    schema = target._schema
    returns, formals = schema.returns, schema.arguments
    if len(returns) != 1 or str(returns[0].type) != "Tensor" or returns[0].alias_info is not None:
        return None
    if any(f.alias_info is not None for f in formals) or torch.Tag.nondeterministic_seeded in target.tags:
        return None
    if any(word in schema.name for word in _HIDDEN_MUTATION):
        return None
    packet = target.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)._schema.arguments
        if len(candidate) != len(formals) + 1:
            continue
        last = candidate[-1]
        if last.alias_info is None or not last.alias_info.is_write or str(last.type) != "Tensor":
            continue
        pairs = zip(candidate[:-1], formals, strict=True)
        if all(str(a.type) == str(b.type) and a.name == b.name for a, b in pairs):
            return name
    return None


def _refuse_baked_in(gm: fx.GraphModule, protected: dict[str, torch.Tensor]) -> None:
    storages = {}
    for name, tensor in protected.items():
        storages.setdefault(tensor.untyped_storage().data_ptr(), name)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target, None)
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            continue
        named = next((n for n, t in protected.items() if t is value), None)
        if named is None and value.untyped_storage().data_ptr() != 0:
            named = storages.get(value.untyped_storage().data_ptr())
        if named is not None:
            raise CaptureError(
                f"forward or loss_fn reads the model's tensor '{named}' other than through the model (a "
                "reference kept from before fit(), e.g. params = list(model.parameters())), so the captured "
                "graph would hold it as a constant and drop its gradient; read it through the model "
                "(model.parameters(), model.layer.weight) inside loss_fn"
            )


def _unpacked_slots(op: dict[str, Any]) -> list[int]:
    base = op["results"][0]
    return list(range(base, base + op["unpacked"])) if base >= 0 else []


def _encode_argument(target: Any, formal: Any, value: Any, slot: dict[fx.Node, int]) -> tuple[Any, ...]:
    if value is _DEFAULT:
        return ("default",)
    if isinstance(value, fx.Node):
        if value not in slot:
            raise CaptureError(
                f"{target}: argument '{formal.name}' is a non-tensor value computed in the graph"
            )
        if not _is_tensor_type(formal.type):
            raise CaptureError(
                f"{target}: argument '{formal.name}' of type {formal.type} depends on tensor data "
                "(data-dependent shapes or scalars cannot be captured)"
            )
        return ("slot", slot[value])
    if isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value):
        items = []
        for v in value:
            if v is None:
                items.append(None)
            elif isinstance(v, fx.Node) and v in slot:
                items.append(slot[v])
            else:
                raise CaptureError(
                    f"{target}: argument '{formal.name}' mixes tensors and values computed from tensor data"
                )
        return ("list", items)
    if isinstance(value, torch.Tensor):
        raise CaptureError(f"{target}: argument '{formal.name}' is an untracked tensor constant")
    return ("const", value)


def capture_step(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batches: Sequence[Sequence[torch.Tensor]],
    *,
    last_label: bool,
    metrics: Sequence[Callable[..., Any]] = (),
    gradients: Gradients = Gradients(),
    data_parallel: distributed.Distributed | None = None,
    channels_last: bool = False,
) -> CapturedStep:
    """Capture and lower one graph per batch size in ``batches`` (real example batches), each checked
    against an eager autograd step of the user's own model on its example batch. Raises CaptureError with
    the reason. Whatever tracing and checking change (Python attributes, buffers, gradients, RNG) is put
    back, so the model is called no more often than a plain loop calls it.

    The graphs return ``(*grads, loss, *metrics)``; each metric is called as ``metric(pred, labels)``
    (``metric(pred)`` without labels) on the step's predictions. ``gradients`` accumulates micro-batches
    and clips inside the graph, checked against the eager loop doing the same with torch's own clipping
    functions.

    With ``data_parallel``, ``model`` is the DDP wrapper's module, the graphs carry DDP's collectives and
    are checked against a step of the DDP wrapper itself on this rank's own batches (every rank captures
    together)."""
    reason = refusal_reason(model, loss_fn)
    if reason is not None:
        raise CaptureError(reason)
    train_names, train, state_names, state = _split_parameters(model)
    if not train:
        raise CaptureError("the model has no trainable parameters")
    captured = CapturedStep(train_names, train, state_names, state, num_batch_inputs=len(batches[0]))
    num_inputs = len(train) + len(state) + captured.num_batch_inputs
    protected = dict(zip(train_names + state_names, train + state, strict=True))
    for batch in batches:
        size = batch[0].shape[0]
        if size in captured.graphs:
            continue
        snapshot = UserState(model, loss_fn)
        try:
            gm = trace_step(
                model,
                loss_fn,
                batch,
                last_label=last_label,
                metrics=metrics,
                gradients=gradients,
                data_parallel=data_parallel,
                channels_last=channels_last,
            )
        finally:
            snapshot.restore()
        captured.largest_tensor = max(captured.largest_tensor, _largest_tensor(gm))
        graph = lower(gm, num_inputs, protected=protected)
        verify(
            graph,
            captured,
            model,
            loss_fn,
            batch,
            last_label=last_label,
            metrics=metrics,
            gradients=gradients,
            data_parallel=data_parallel,
        )
        captured.graphs[size] = graph
    return captured


def _largest_tensor(gm: fx.GraphModule) -> int:
    sizes = [
        value.numel()
        for node in gm.graph.nodes
        for value in torch.utils._pytree.tree_leaves(node.meta.get("val"))
        if isinstance(value, torch.Tensor)
    ]
    return max(sizes, default=0)


def verify(
    graph: Any,
    captured: CapturedStep,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
    *,
    last_label: bool,
    metrics: Sequence[Callable[..., Any]] = (),
    rtol: float = 1e-4,
    gradients: Gradients = Gradients(),
    data_parallel: distributed.Distributed | None = None,
) -> None:
    """Run ``graph`` and an eager autograd step of the user's own model and loss (what their closures see)
    from the same parameters, buffers and RNG state, and raise CaptureError if loss, gradients or buffer
    updates disagree, or if the eager step changed Python state that the graph froze. Puts the model, its
    gradients, buffers and Python attributes and the RNG state back as they were."""
    devices = [d for d in {t.device for t in (*captured.params, *batch)} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        rng = torch.get_rng_state()
        cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]
        snapshot = UserState(model, loss_fn)
        try:
            # each run gets its own copy of the batch: forward may write into its inputs
            reference = _eager_reference(
                captured,
                model if data_parallel is None else data_parallel.wrapper,
                loss_fn,
                [t.clone() for t in batch],
                last_label=last_label,
                metrics=metrics,
                gradients=gradients,
            )
            if data_parallel is not None:  # the graph reports the ranks' mean loss and metrics
                loss, *values = distributed.mean_over_ranks(data_parallel, [reference[0], *reference[3]])
                reference = (loss, reference[1], reference[2], values)
            stateful = snapshot.changes()
        finally:
            snapshot.restore()
        if stateful:
            raise CaptureError(stateful_reason(stateful))
        torch.set_rng_state(rng)
        for d, s in zip(devices, cuda_rng, strict=True):
            torch.cuda.set_rng_state(s, d)
        state = [t.detach().clone() for t in captured.state]
        inputs = [p.detach().clone() for p in captured.params] + state + [t.clone() for t in batch]
        try:
            outputs = graph(inputs)
        except Exception as exc:
            raise CaptureError(f"the captured graph fails to run: {exc}") from exc
    _check_outputs(graph, outputs, reference, captured, state, num_metrics=len(metrics), rtol=rtol)


def _check_outputs(
    graph: Any,
    outputs: Sequence[torch.Tensor],
    reference: tuple[Any, ...],
    captured: CapturedStep,
    state: Sequence[torch.Tensor],
    *,
    num_metrics: int,
    rtol: float,
) -> None:
    """Raise CaptureError where the graph's loss, metrics, gradients or buffer updates differ from eager's."""
    ref_loss, ref_grads, ref_state, ref_metrics = reference
    num_params = len(captured.params)
    if len(outputs) != num_params + 1 + num_metrics:
        raise CaptureError(
            f"the captured graph returns {len(outputs)} values, expected {num_params + 1 + num_metrics}"
        )
    random = any(
        name.startswith(("aten::bernoulli", "aten::rand", "aten::normal", "aten::native_dropout"))
        for name in graph.op_names
    )
    hint = (
        "forward or loss_fn behaves differently from the captured graph (Python state or data-dependent "
        "control flow that tracing froze" + (", or random numbers drawn differently" if random else "") + ")"
    )
    _compare("the loss", outputs[num_params], ref_loss, rtol, hint)
    for i, (value, ref) in enumerate(zip(outputs[num_params + 1 :], ref_metrics, strict=True)):
        _compare(f"train metric {i}", value, ref, rtol, hint)
    # A gradient that is zero up to rounding (a bias before BatchNorm, attention's key bias) is compared on
    # the scale of all gradients, not its own.
    floor = max((_scale(g) for g in ref_grads if g is not None), default=0.0) * 1e-6
    for name, grad, ref in zip(captured.param_names, outputs[:num_params], ref_grads, strict=True):
        if ref is None:
            raise CaptureError(
                f"parameter '{name}' gets no gradient from the loss; the native engine needs every trainable "
                "parameter to be used (set requires_grad=False on unused ones)"
            )
        _compare(f"the gradient of '{name}'", grad, ref, rtol, hint, floor=floor)
    for name, value, ref in zip(captured.state_names, state, ref_state, strict=True):
        _compare(f"buffer '{name}' after the step", value, ref, rtol, hint)


def _eager_reference(
    captured: CapturedStep,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batch: Sequence[torch.Tensor],
    *,
    last_label: bool,
    metrics: Sequence[Callable[..., Any]],
    gradients: Gradients = Gradients(),
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]:
    """Loss, gradients (in ``captured.params`` order), buffers after the step (``captured.state`` order) and
    metrics of one plain forward/backward (one per micro-batch, the loss divided by their count) of the
    user's own model, clipped as ``gradients`` says; the caller restores the model."""
    was_training = model.training
    model.train()
    for p in captured.params:
        p.grad = None
    k = gradients.accumulate
    losses, sums = [], []
    try:
        for micro in gradients.split(batch):
            with torch.enable_grad():
                pred, labels, loss = forward_and_loss(model, loss_fn, micro, last_label)
                if not isinstance(loss, torch.Tensor):
                    raise CaptureError(f"loss_fn must return a tensor, got {type(loss).__name__}")
                (loss if k == 1 else loss / k).backward()
            with torch.no_grad():
                values = [
                    torch.as_tensor(metric(pred, labels) if last_label else metric(pred)).detach().reshape(())
                    for metric in metrics
                ]
            losses.append((loss.detach().reshape(()), micro[0].shape[0]))
            sums.append(values)
        if gradients.clip is not None:
            gradients.clip.eager_(gradients.clipped)
        grads = [p.grad.detach().clone() if p.grad is not None else None for p in captured.params]
        state = [t.detach().clone() for t in captured.state]
    finally:
        model.train(was_training)
    if k == 1:
        return losses[0][0], grads, state, sums[0]
    total = batch[0].shape[0]
    loss = sum(value * count for value, count in losses) / total
    values = [
        sum(v[i] * c for v, (_, c) in zip(sums, losses, strict=True)) / total for i in range(len(metrics))
    ]
    return loss, grads, state, values


def _scale(tensor: torch.Tensor) -> float:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0.0
    return tensor.detach().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max().item()


def _compare(
    what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, hint: str, floor: float = 0.0
) -> None:
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise CaptureError(
            f"{what} has shape {tuple(actual.shape)} {actual.dtype} in the captured graph but "
            f"{tuple(expected.shape)} {expected.dtype} in an eager step: {hint}"
        )
    if not actual.is_floating_point():
        if not torch.equal(actual, expected):
            raise CaptureError(f"{what} differs between the captured graph and an eager step: {hint}")
        return
    scale = _scale(expected)
    atol = rtol * scale + floor + 1e-12
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True):
        error = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        raise CaptureError(
            f"{what} differs between the captured graph and an eager step (max abs difference {error:.3g}, "
            f"largest value {scale:.3g}): {hint}"
        )
