"""Random draws in the order eager draws them: a graph pass over a traced step, so that captured dropout on a
transposed or otherwise non-contiguous tensor (attention, ``TransformerEncoderLayer``) uses the same random
numbers as the eager step.

Eager dropout on the CPU fills ``empty_like(input).bernoulli_(1 - p)``: the mask has the input's layout
and ``bernoulli_`` draws in memory order. Traced under ``torch.func``, the mask becomes
``bernoulli(expand(...))``, a contiguous tensor drawn in logical order, so on a transposed input the same
numbers land on other elements. The pass draws a contiguous mask in the input's memory order and permutes
it back.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx

_aten = torch.ops.aten
# ops between the drawn mask and the multiply by the input: eager's `noise.div_(1 - p)` and friends
_SCALINGS = (_aten.div_.Scalar, _aten.div.Scalar, _aten.mul_.Scalar, _aten.mul.Scalar)
_MULTIPLIES = (_aten.mul.Tensor, _aten.mul_.Tensor)


def draw_as_eager(gm: fx.GraphModule) -> int:
    """Rewrite each dropout mask of ``gm`` that eager would draw in another order; returns how many."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _aten.bernoulli.p:
            continue
        mask = node.meta.get("val")
        layout = _eager_layout(node)
        if not isinstance(mask, torch.Tensor) or layout is None:
            continue
        order = memory_order(layout)
        if order is None or order == list(range(mask.dim())):
            continue
        _draw_in(gm.graph, node, mask, order)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def memory_order(tensor: torch.Tensor) -> list[int] | None:
    """The dimensions of ``tensor`` from outermost to innermost in memory (how TensorIterator walks an
    ``empty_like`` of it); None where strides tie on dimensions longer than one (no single order)."""
    dims = list(range(tensor.dim()))
    order = sorted(dims, key=lambda d: (-tensor.stride(d), d))
    long = [tensor.stride(d) for d in order if tensor.shape[d] > 1]
    if len(set(long)) != len(long):
        return None
    # size-one dimensions do not change which element a draw lands on: keep them where they are
    placed = iter(d for d in order if tensor.shape[d] > 1)
    return [next(placed) if tensor.shape[d] > 1 else d for d in dims]


def _eager_layout(bernoulli: fx.Node) -> torch.Tensor | None:
    """The tensor eager's mask is shaped like: the other factor of the multiply the mask ends in."""
    node = bernoulli
    while len(node.users) >= 1:
        users = [u for u in node.users if u.op == "call_function"]
        scaling = [u for u in users if u.target in _SCALINGS and u.args[0] is node]
        if len(scaling) == 1:
            node = scaling[0]
            continue
        for user in users:
            if user.target in _MULTIPLIES and len(user.args) == 2:
                other = user.args[1] if user.args[0] is node else user.args[0]
                value = other.meta.get("val") if isinstance(other, fx.Node) else None
                if isinstance(value, torch.Tensor) and value.shape == bernoulli.meta["val"].shape:
                    return value
        return None
    return None


def _draw_in(graph: fx.Graph, node: fx.Node, mask: torch.Tensor, order: list[int]) -> None:
    inverse = sorted(range(len(order)), key=order.__getitem__)
    shape = [mask.shape[d] for d in order]
    options: dict[str, Any] = {"dtype": mask.dtype, "device": mask.device}
    with graph.inserting_before(node):
        empty = graph.call_function(_aten.empty.memory_format, (shape,), options)
        drawn = graph.call_function(_aten.bernoulli.p, (empty, *node.args[1:]), dict(node.kwargs))
        permuted = graph.call_function(_aten.permute.default, (drawn, inverse))
    fake_mode = getattr(mask, "fake_mode", None)  # the values the graph recorded are fake tensors
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        meta = torch.empty(shape, dtype=mask.dtype, device=mask.device if fake_mode else "meta")
    empty.meta["val"], drawn.meta["val"] = meta, meta
    permuted.meta["val"] = meta.permute(inverse)
    node.replace_all_uses_with(permuted)
    graph.erase_node(node)
    # in-place scalings of the mask now write a permuted tensor: their recorded layout follows it
    for user in list(permuted.users):
        if user.target in (_aten.div_.Scalar, _aten.mul_.Scalar):
            user.meta["val"] = permuted.meta["val"]
