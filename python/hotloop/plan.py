"""The checked plan of one training run: ``fit()``'s arguments validated once, then passed down whole.

Every later layer (the engine choice, each engine, the session that yields events) takes a :class:`Plan`
instead of sixteen arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _checks as check
from . import distributed
from .clipping import GradClip, check_clip

ENGINE_NAMES = ("auto", "graph", "aot", "native", "python")
MEMORY_FORMATS = ("auto", "preserve", "channels_last")
STATE_VERSION = 1  # of FitStream.state_dict()
# fit()'s defaults for the options a Plan keeps as they are (after checking them).
OPTION_DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "shuffle": True,
    "last_label": True,
    "generator": None,
    "step_offset": 0,
    "every": None,
    "drop_last": False,
    "engine": "auto",
    "scheduler": None,
    "scheduler_every": "step",
    "on_nonfinite": "raise",
    "amp": None,
    "resume": None,
    "clip_grad_norm": None,
    "clip_grad_value": None,
    "accumulate": 1,
    "seed": 0,
    "sync_every": None,
    "memory_format": "auto",
}


@dataclass(frozen=True)
class Plan:
    """What ``fit()`` was asked to do, checked: the user's objects, the data on its device, the options."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[..., torch.Tensor]
    train_data: tuple[torch.Tensor, ...]  # on the model's device
    batch_size: int
    shuffle: bool
    drop_last: bool
    last_label: bool
    generator: torch.Generator | None
    every: int | None
    engine: str  # one of ENGINE_NAMES
    metrics: Mapping[str, Callable[..., Any]]  # resolved: {event key: fn(pred, labels)}
    scheduler: Any | None
    scheduler_every: str  # "step" or "event"
    on_nonfinite: str  # "raise", "stop" or "continue"
    amp: str | None  # None, "bf16" or "fp16"
    extra: Mapping[str, Any] = field(default_factory=dict)
    step_offset: int = 0
    resume: Mapping[str, Any] | None = None
    grad_clip: GradClip | None = None  # fit()'s clip_grad_norm and clip_grad_value, checked
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    memory_format: str = "auto"  # one of MEMORY_FORMATS: the layout the native engine runs 4-D tensors in

    @property
    def step_samples(self) -> int:
        """Samples per optimizer step: what the Dataset gathers as one batch (engines split it into
        ``accumulate`` micro-batches of ``batch_size``)."""
        return self.batch_size * self.accumulate

    # Data-parallel (a DistributedDataParallel model under torchrun): the shard's seed and the setup.
    seed: int = 0
    sync_every: int | None = None
    data_parallel: distributed.Distributed | None = None

    @property
    def module(self) -> nn.Module:
        """The module whose tensors train: the model, or the one a DDP wrapper holds."""
        return self.data_parallel.module if self.data_parallel is not None else self.model

    @property
    def device(self) -> torch.device:
        return self.train_data[0].device

    @property
    def step_scheduler(self) -> Any | None:
        """The scheduler to step after every optimizer step (None: there is none, or it steps per event)."""
        return self.scheduler if self.scheduler_every == "step" else None

    @property
    def guard_nonfinite(self) -> bool:
        """Whether a step with a non-finite loss must not be applied (a step whose gradient norm is not
        finite under ``error_if_nonfinite`` reports a non-finite loss)."""
        return self.on_nonfinite != "continue" or self.error_if_nonfinite_norm

    @property
    def error_if_nonfinite_norm(self) -> bool:
        """Whether a non-finite total gradient norm must raise, as ``clip_grad_norm_`` does."""
        clip = self.grad_clip
        return clip is not None and clip.norm is not None and clip.norm.error_if_nonfinite

    @property
    def metric_fns(self) -> list[Callable[..., Any]]:
        return list(self.metrics.values())


def make_plan(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    device: str | torch.device | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    **options: Any,
) -> Plan:
    """Check ``fit()``'s arguments (errors name the argument), place the data, and run the model and loss
    once on the first batch without side effects, so that shape and dtype mistakes fail here. Options not
    given take ``fit()``'s defaults."""
    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown fit() options: {', '.join(sorted(unknown))}")
    options = {**OPTION_DEFAULTS, **options}
    _check_options(options)
    grad_clip = check_clip(options.pop("clip_grad_norm"), options.pop("clip_grad_value"))
    last_label = options["last_label"]
    resolved_metrics = check.check_metrics(metrics, last_label=last_label)
    _check_objects(model, optimizer, loss_fn, options)
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    tensors = _placed_data(train_data, model, device, last_label)
    generator = options["generator"]
    if generator is not None and generator.device.type != tensors[0].device.type:
        raise ValueError(f"generator is on {generator.device} but train_data is on {tensors[0].device}")
    step_samples = options["batch_size"] * options["accumulate"]
    if options["drop_last"] and step_samples > tensors[0].shape[0]:
        raise ValueError(
            f"drop_last=True with batch_size={options['batch_size']} times "
            f"accumulate={options['accumulate']} larger than the {tensors[0].shape[0]} samples would leave "
            "no batch"
        )
    check.check_first_batch(model, loss_fn, tensors, batch_size=options["batch_size"], last_label=last_label)
    data_parallel = distributed.setup(model, seed=options["seed"], sync_every=options["sync_every"])
    if data_parallel is not None:
        agreed = ("batch_size", "shuffle", "drop_last", "seed", "every", "engine", "on_nonfinite")
        agreed += ("sync_every",)
        distributed.check_agreement(
            data_parallel, num_samples=tensors[0].shape[0], **{k: options[k] for k in agreed}
        )
    return Plan(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        train_data=tuple(tensors),
        metrics=resolved_metrics,
        extra=dict(extra or {}),
        grad_clip=grad_clip,
        data_parallel=data_parallel,
        **options,
    )


def _check_options(options: Mapping[str, Any]) -> None:
    check.check_int("batch_size", options["batch_size"], minimum=1)
    check.check_bool("shuffle", options["shuffle"])
    check.check_bool("last_label", options["last_label"])
    check.check_bool("drop_last", options["drop_last"])
    check.check_int("step_offset", options["step_offset"])
    check.check_int("accumulate", options["accumulate"], minimum=1)
    check.check_int("seed", options["seed"])
    if options["sync_every"] is not None:
        check.check_int("sync_every", options["sync_every"], minimum=1)
    if options["every"] is not None:
        check.check_int("every", options["every"], minimum=1)
    check.check_choice("engine", options["engine"], ENGINE_NAMES)
    check.check_choice("scheduler_every", options["scheduler_every"], ("step", "event"))
    check.check_choice("on_nonfinite", options["on_nonfinite"], ("raise", "stop", "continue"))
    check.check_choice("amp", options["amp"], (None, "bf16", "fp16"))
    check.check_choice("memory_format", options["memory_format"], MEMORY_FORMATS)
    generator = options["generator"]
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if options["resume"] is not None:
        check_resume_state(options["resume"])


def _check_objects(model: Any, optimizer: Any, loss_fn: Any, options: Mapping[str, Any]) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (none with requires_grad=True)")
    check.check_optimizer(optimizer, model)
    check.check_callable("loss_fn", loss_fn)
    check.check_scheduler(options["scheduler"], optimizer)


def _placed_data(
    train_data: Any, model: nn.Module, device: str | torch.device | None, last_label: bool
) -> list[torch.Tensor]:
    tensors = check.check_tensors("train_data", train_data, last_label=last_label)
    target = check.model_device(model)
    if device is not None:
        wanted = torch.device(device)
        if wanted.type != target.type or (wanted.index is not None and wanted != target):
            raise ValueError(
                f"device={wanted} differs from the model's device {target}; move the model first"
            )
        tensors = check.place_on_device(tensors, target)
    if tensors[0].device != target:
        raise ValueError(
            f"train_data is on {tensors[0].device} but the model is on {target}; move the data "
            f"(or pass device={str(target)!r} to copy it once)"
        )
    return tensors


_RESUME_KEYS = frozenset(
    {
        "version",
        "model",
        "optimizer",
        "step",
        "updates",
        "epochs_completed",
        "batch_index",
        "epoch_order",
        "num_samples",
        "generator",
        "rng",
        "scheduler",
        "batching",
    }
)


def check_resume_state(state: Any) -> None:
    if not isinstance(state, Mapping) or not _RESUME_KEYS <= set(state):
        raise TypeError("resume must be the dict returned by FitStream.state_dict()")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"resume state has version {state['version']}, this hotloop reads {STATE_VERSION}")
