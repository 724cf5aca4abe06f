"""Convolutions in channels_last inside the native engine's graph: the conversion tracing applies, and a
graph pass that keeps the backward pass from mixing layouts.

The user's tensors keep their layout: the captured step reads channels_last copies of the 4-D weights and
batch inputs (the same values), and its gradients are laid out like the parameters again before they
reach ``.grad``. Only the kernels differ: channels_last convolutions and pooling round differently from
the contiguous ones a plain loop runs, within float32 rounding.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

_aten = torch.ops.aten
CHANNELS_LAST = torch.channels_last


def to_channels_last(tensor: torch.Tensor, *, copy: bool) -> torch.Tensor:
    """``tensor`` laid out channels_last when it is a 4-D floating tensor, else itself.

    With ``copy`` (weights) always a copy: a weight with a single input channel is "contiguous" in both
    layouts, and only channels_last strides make the convolution choose its channels_last kernel. Without
    (a batch) no copy where the memory is already laid out so."""
    if tensor.dim() != 4 or not tensor.is_floating_point():
        return tensor
    if copy:
        return tensor.clone(memory_format=CHANNELS_LAST)
    return tensor.contiguous(memory_format=CHANNELS_LAST)


def _is_channels_last(value: object) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 4
        and value.is_contiguous(memory_format=CHANNELS_LAST)
        and not value.is_contiguous()
    )


def _is_plain_4d(value: object) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 4
        and value.is_floating_point()
        and value.is_contiguous()
        and not value.is_contiguous(memory_format=CHANNELS_LAST)
    )


def match_layouts(gm: fx.GraphModule) -> int:
    """Give channels_last to the contiguous 4-D inputs of ops that also read a channels_last one; returns
    how many were converted.

    The gradient that flows back through a flatten is contiguous, and a pooling backward that reads it
    with a channels_last input runs a slow mixed-layout kernel (measured 5x slower on the benchmark CNN
    than converting the gradient first). Only arguments the op does not write are converted, never in a
    graph that reinterprets memory with ``as_strided``; the fake-tensor metadata is then recomputed."""
    graph = gm.graph
    if any(node.target in (_aten.as_strided.default, _aten.as_strided_.default) for node in graph.nodes):
        return 0
    converted = 0
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.is_view:
            continue
        if target in (_aten.clone.default, _aten.contiguous.default, _aten.copy_.default):
            continue
        formals = target._schema.arguments
        values = [
            node.args[i] if i < len(node.args) else node.kwargs.get(f.name) for i, f in enumerate(formals)
        ]
        metas = [v.meta.get("val") if isinstance(v, fx.Node) else None for v in values]
        if not any(_is_channels_last(m) for m in metas):
            continue
        args = list(node.args)
        for i, (formal, value, meta) in enumerate(zip(formals, values, metas, strict=True)):
            if i >= len(args) or formal.alias_info is not None or not _is_plain_4d(meta):
                continue
            with graph.inserting_before(node):
                args[i] = graph.call_function(_aten.clone.default, (value,), {"memory_format": CHANNELS_LAST})
            converted += 1
        node.args = tuple(args)
    if converted:
        graph.lint()
        gm.recompile()
        placeholders = [n.meta["val"] for n in graph.nodes if n.op == "placeholder"]
        FakeTensorProp(gm, detect_fake_mode(placeholders)).propagate_dont_convert_inputs(*placeholders)
    return converted
