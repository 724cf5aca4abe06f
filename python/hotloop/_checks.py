"""Argument checks shared by the public functions: each error names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .fidelity import UserState
from .metrics import resolve_metrics


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_tensors(name: str, data: Any, *, last_label: bool) -> list[torch.Tensor]:
    """Aligned batch-first tensors: a non-empty tuple/list of tensors with one sample count, on one device."""
    if isinstance(data, torch.Tensor):
        raise TypeError(f"{name} must be a tuple or list of tensors, got a single Tensor; pass e.g. (X, y)")
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise TypeError(f"{name} must be a tuple or list of tensors, got {type(data).__name__}")
    tensors = list(data)
    if not tensors:
        raise ValueError(f"{name} must contain at least one tensor")
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0:
            raise ValueError(f"{name}[{i}] must have a sample (first) dimension, got a 0-dim tensor")
    if last_label and len(tensors) < 2:
        raise ValueError(f"last_label=True requires at least two tensors in {name} (inputs and labels)")
    counts = [t.shape[0] for t in tensors]
    for i, count in enumerate(counts):
        if count != counts[0]:
            raise ValueError(
                f"{name} tensors must have the same number of samples: {name}[0] has {counts[0]}, "
                f"{name}[{i}] has {count}"
            )
    if counts[0] == 0:
        raise ValueError(f"{name} has zero samples")
    devices = [t.device for t in tensors]
    for i, device in enumerate(devices):
        if device != devices[0]:
            raise ValueError(
                f"{name} tensors must be on one device: {name}[0] is on {devices[0]}, "
                f"{name}[{i}] is on {device}"
            )
    return tensors


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def check_optimizer(optimizer: Any, model: nn.Module) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    owned = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            if id(param) not in owned:
                raise ValueError(
                    f"optimizer param_groups[{g}]['params'][{i}] (shape {tuple(param.shape)}) is not a "
                    "parameter of model; build the optimizer from model.parameters()"
                )
    return optimizer


def place_on_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copy the data once to ``device``, turning an out-of-memory error into one that tells the sizes."""
    try:
        return [t.to(device) for t in tensors]
    except torch.OutOfMemoryError as exc:
        sizes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors)
        total = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        raise torch.OutOfMemoryError(
            f"train_data ({total:.1f} MiB: {sizes}) does not fit on {device}: {exc}"
        ) from exc


def check_first_batch(
    model: nn.Module,
    loss_fn: Callable[..., Any],
    tensors: list[torch.Tensor],
    *,
    batch_size: int,
    last_label: bool,
) -> None:
    """Run the model and loss once on the first batch, without side effects, so that wrong dtypes or shapes
    fail before training with a message that names the offending tensor.

    Buffers, the Python attributes of the model's modules (a call counter, a cache) and the random generators
    are put back afterwards, so the run that follows is exactly the run that would have happened without
    this check.
    """
    count = min(batch_size, tensors[0].shape[0])
    batch = [t[:count].clone() for t in tensors]  # forward may write into its inputs
    inputs, labels = (batch[:-1], batch[-1]) if last_label else (batch, None)
    devices = [t.device for t in tensors if t.device.type == "cuda"]
    snapshot = UserState(model, loss_fn)
    with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
        was_training = model.training
        model.train()
        try:
            try:
                pred = model(*inputs)
            except Exception as exc:
                raise _explain(exc, "model(*inputs)", _input_hint(model, inputs)) from exc
            try:
                loss = loss_fn(pred, labels) if last_label else loss_fn(pred)
            except Exception as exc:
                raise _explain(
                    exc,
                    "loss_fn(pred, labels)" if last_label else "loss_fn(pred)",
                    _label_hint(loss_fn, pred, labels),
                ) from exc
        finally:
            model.train(was_training)
            snapshot.restore()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a single-value tensor (the batch's mean loss), got {shape}")
    if not loss.dtype.is_floating_point:
        raise TypeError(f"loss_fn must return a floating-point loss, got {loss.dtype}")


def _describe(tensors: Sequence[torch.Tensor], offset: int = 0) -> str:
    return ", ".join(f"train_data[{offset + i}]: {t.dtype} {tuple(t.shape)}" for i, t in enumerate(tensors))


def _explain(exc: Exception, call: str, hint: str | None) -> Exception:
    message = f"{call} failed on the first batch of train_data: {exc}"
    if hint:
        return TypeError(f"{message}\n{hint}")
    if hasattr(exc, "add_note"):
        exc.add_note(f"hotloop: {call} failed on the first batch of train_data")
    return exc


def _input_hint(model: nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    float_params = [p for p in model.parameters() if p.dtype.is_floating_point]
    if not float_params:
        return None
    layers = [
        type(m).__name__ for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    for i, tensor in enumerate(inputs):
        if not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and layers:
            return (
                f"train_data[{i}] is {tensor.dtype} but the model's {layers[0]} layers expect floating-point "
                f"features ({float_params[0].dtype}); convert it with .float() (inputs: {_describe(inputs)})"
            )
    return None


def _label_hint(loss_fn: Callable[..., Any], pred: Any, labels: torch.Tensor | None) -> str | None:
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__).lower()
    if labels is None or not isinstance(pred, torch.Tensor):
        return None
    if (
        "crossentropy" in name or "cross_entropy" in name or "nll" in name
    ) and labels.dim() == pred.dim() - 1:
        if labels.dtype.is_floating_point:
            return (
                f"the labels (train_data[-1]) are {labels.dtype} {tuple(labels.shape)}, but cross-entropy "
                "with "
                "class indices expects int64 labels; convert them with .long()"
            )
    return None


def check_metrics(metrics: Any, *, last_label: bool = True) -> dict[str, Callable[..., Any]]:
    """Train metrics as ``{event_key: fn}``; names resolve to the built-in metrics."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of event key -> metric, got {type(metrics).__name__}")
    return resolve_metrics(metrics, last_label=last_label)


def check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise TypeError(
            "scheduler: ReduceLROnPlateau needs a metric; step it from the stream instead, e.g. "
            "tap(lambda event: plateau.step(event['val_loss']))"
        )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(
            f"scheduler must be a torch.optim.lr_scheduler scheduler, got {type(scheduler).__name__}"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError("scheduler must schedule the optimizer passed to fit()")
