"""What a captured step would silently drop, and how to run the user's own code without leaving a trace.

Three tools keep the native engines honest (the fidelity contract in the README):
- :func:`refusal_reason` names what a captured graph cannot carry: module and tensor hooks (the legacy
  ``torch.nn.utils.weight_norm`` among them), wrappers whose work lives in autograd hooks (DDP, FSDP),
  ``torch.compile``d modules. Parametrizations (``torch.nn.utils.parametrizations``) are ordinary submodules
  called in forward: they are traced like the rest, and the capture check compares them.
- :class:`UserState` snapshots the user's model (tensors, gradients and the plain Python attributes of
  every module, plus what ``loss_fn`` closes over) so a check can run the user's own objects and put
  everything back; :meth:`UserState.changes` tells whether the code changed Python state, which a trace
  would freeze.
- :func:`reparametrized` runs forward *and* loss with the model's tensors swapped for graph inputs, so a
  loss that reads ``model.parameters()`` (an L2 penalty, weight tying in the loss) is differentiated too.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ._shared import forward_and_loss

# The attributes nn.Module keeps for itself; everything else in a module's __dict__ is the user's.
_MODULE_MACHINERY = frozenset(nn.Module().__dict__)
_HOOK_DICTS = {
    "_forward_pre_hooks": "a forward pre-hook",
    "_forward_hooks": "a forward hook",
    "_backward_pre_hooks": "a backward pre-hook",
    "_backward_hooks": "a backward hook",
}


@contextmanager
def reparametrized(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, every read of the model's parameters and buffers (by forward, by ``loss_fn``
    through ``model.parameters()`` or ``model.layer.weight``) sees ``tensors`` instead."""
    with _reparametrize_module(model, dict(tensors), tie_weights=True):
        yield


def refusal_reason(model: nn.Module, loss_fn: Callable[..., Any] | None = None) -> str | None:
    """Why a captured step of ``model`` (and ``loss_fn``) would differ from a plain loop's, or None."""
    wrapper = _wrapper_reason(model)
    if wrapper is not None:
        return wrapper
    modules = list(_named_modules(model, "model"))
    if isinstance(loss_fn, nn.Module) and loss_fn is not model:
        modules += list(_named_modules(loss_fn, "loss_fn"))
    for where, module in modules:
        for attribute, kind in _HOOK_DICTS.items():
            if getattr(module, attribute, None):
                hooks = _hook_names(getattr(module, attribute))
                return f"{where} has {kind} ({hooks}), which a captured graph would not run"
    global_hooks = _global_module_hooks()
    if global_hooks:
        return f"global module hooks are registered ({global_hooks}), which a captured graph would not run"
    for where, module in modules:
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None:
                continue
            if getattr(tensor, "_backward_hooks", None):
                return (
                    f"{_join(where, name)} has a gradient hook (Tensor.register_hook), which a captured "
                    "graph would not run"
                )
            if getattr(tensor, "_post_accumulate_grad_hooks", None):
                return (
                    f"{_join(where, name)} has a post-accumulate-grad hook "
                    "(register_post_accumulate_grad_hook), which a captured graph would not run"
                )
    return None


def _wrapper_reason(model: nn.Module) -> str | None:
    kind = type(model)
    if _is_instance_of(model, "torch.nn.parallel", "DistributedDataParallel"):
        return (
            "the model is wrapped in DistributedDataParallel, whose gradient all-reduce lives in autograd "
            "hooks that a captured step would drop (the ranks would drift apart)"
        )
    if _is_instance_of(model, "torch.nn.parallel", "DataParallel"):
        return "the model is wrapped in nn.DataParallel, which scatters batches in Python at every step"
    if _is_instance_of(model, "torch.distributed.fsdp", "FullyShardedDataParallel") or any(
        c.__name__ == "FSDPModule" for c in kind.__mro__
    ):
        return (
            "the model is sharded with FSDP, whose parameter gathers and gradient reductions live in hooks "
            "that a captured step would drop"
        )
    if _is_instance_of(model, "torch._dynamo.eval_frame", "OptimizedModule"):
        return (
            "the model was wrapped by torch.compile; pass the plain module (model._orig_mod) to fit() and "
            "the native engine captures it itself"
        )
    return None


def _is_instance_of(obj: Any, module_name: str, class_name: str) -> bool:
    return any(c.__name__ == class_name and c.__module__.startswith(module_name) for c in type(obj).__mro__)


def _named_modules(root: nn.Module, label: str) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules(remove_duplicate=True):
        yield (f"{label} module '{name}'" if name else label), module


def _join(where: str, name: str) -> str:
    return f"{where}: tensor '{name}'"


def _hook_names(hooks: Mapping[int, Any]) -> str:
    return ", ".join(getattr(h, "__qualname__", type(h).__name__) for h in hooks.values())


def _global_module_hooks() -> str:
    from torch.nn.modules import module as module_mod

    found = [
        label
        for attribute, label in (
            ("_global_forward_pre_hooks", "forward pre-hook"),
            ("_global_forward_hooks", "forward hook"),
            ("_global_backward_pre_hooks", "backward pre-hook"),
            ("_global_backward_hooks", "backward hook"),
        )
        if getattr(module_mod, attribute, None)
    ]
    return ", ".join(found)


class UserState:
    """A snapshot of what running the user's forward and loss may change: parameter and buffer values,
    gradients, plain Python attributes of every module (and of ``loss_fn``: its attributes if it is a module,
    the variables it closes over otherwise). ``restore()`` puts back whatever differs."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable[..., Any] | None = None, *, tensors: bool = True
    ) -> None:
        """``tensors=False`` watches the Python state only (no copy of the model's tensors; ``restore``
        then puts back attributes and variables alone)."""
        own = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        # The model's own tensors are restored by value below; attributes that refer to them (an RNN's
        # flat weight list) keep referring to the very same objects.
        self._memo = dict(own)
        self._tensors = [
            (t, t.detach().clone(), t.grad.detach().clone() if t.grad is not None else None)
            for t in (own.values() if tensors else ())
        ]
        modules = list(_named_modules(model, "model"))
        if isinstance(loss_fn, nn.Module) and loss_fn is not model:
            modules += list(_named_modules(loss_fn, "loss_fn"))
        self._attributes = [
            (where, module.__dict__, {k: self._copy(v) for k, v in _user_attributes(module.__dict__)})
            for where, module in modules
        ]
        # Variables that loss_fn, the modules' forwards and their hooks close over (a counter, a list a hook
        # appends activations to).
        functions = [("loss_fn", loss_fn)]
        for where, module in modules:
            functions.append((f"{where} forward", type(module).forward))
            functions += [
                (f"{where} hook", hook)
                for attribute in _HOOK_DICTS
                for hook in getattr(module, attribute, {}).values()
            ]
        self._cells = []
        for owner, function in functions:
            for name, cell in _closure_cells(function):
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(value, (nn.Module, torch.Tensor)) or callable(value):
                    continue  # the model, a tensor it reads, a function: nothing a call moves
                self._cells.append((f"{owner}'s variable '{name}'", cell, self._copy(value)))

    def changes(self) -> list[str]:
        """Python state that differs from the snapshot (what a trace would have frozen)."""
        changed = []
        for where, live, saved in self._attributes:
            for key in sorted(set(dict(_user_attributes(live))) | set(saved)):
                if key not in live or key not in saved or not _same(live[key], saved[key]):
                    changed.append(f"{where} attribute '{key}'")
        for name, cell, saved in self._cells:
            if not _same(cell.cell_contents, saved):
                changed.append(name)
        return changed

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value, grad in self._tensors:
                tensor.copy_(value)
                tensor.grad = grad
        for _, live, saved in self._attributes:
            for key in set(dict(_user_attributes(live))) - set(saved):
                del live[key]
            for key, value in saved.items():
                if key not in live or not _same(live[key], value):
                    live[key] = self._copy(value)
        for _, cell, saved in self._cells:
            if not _same(cell.cell_contents, saved):
                cell.cell_contents = self._copy(saved)

    def _copy(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value if id(value) in self._memo else value.detach().clone()
        try:
            return copy.deepcopy(value, dict(self._memo))
        except Exception:
            return value  # not copyable: compared by identity


def _user_attributes(namespace: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in namespace.items():
        if key not in _MODULE_MACHINERY and not isinstance(value, nn.Module):
            yield key, value


def _closure_cells(fn: Any) -> list[tuple[str, Any]]:
    if isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None)
    if code is None or not closure:
        return []
    return list(zip(code.co_freevars, closure, strict=True))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        try:
            return (
                a.shape == b.shape
                and a.dtype == b.dtype
                and a.device == b.device
                and bool(torch.equal(a.detach(), b.detach()))
            )
        except Exception:  # a fake tensor left behind by tracing
            return False
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def python_state_changes(
    model: nn.Module, loss_fn: Callable[..., Any], batch: list[torch.Tensor], *, last_label: bool
) -> list[str]:
    """The Python state that one training-mode forward and loss on ``batch`` change, all put back after
    (tensors, attributes, random generators): what a replayed capture would freeze."""
    snapshot = UserState(model, loss_fn)
    devices = sorted({t.device for t in batch if t.device.type == "cuda"}, key=str)
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train()
            forward_and_loss(model, loss_fn, [t.clone() for t in batch], last_label)
        return snapshot.changes()
    finally:
        model.train(was_training)
        snapshot.restore()


def stateful_reason(changes: list[str], who: str = "forward or loss_fn") -> str:
    """The fallback reason for code that changes Python state (``changes`` from :meth:`UserState.changes`)."""
    return (
        f"{who} changes Python state ({', '.join(changes[:3])}), which a captured step would freeze at its "
        "value during capture"
    )
