"""Gradient clipping as ``fit(clip_grad_norm=..., clip_grad_value=...)`` asks for it: the checked options, the
eager clip the python engine runs, and the same maths on gradient values that the native engine traces into
its joint graph. Both follow ``torch.nn.utils.clip_grad_norm_``/``clip_grad_value_`` op for op (foreach
kernels, as torch uses them for CPU and CUDA tensors), so the two engines clip to the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class NormClip:
    """``clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)``'s arguments."""

    max_norm: float
    norm_type: float = 2.0
    error_if_nonfinite: bool = False


@dataclass(frozen=True)
class GradClip:
    """What to do to the gradients of the optimizer's parameters between ``backward()`` and ``step()``:
    ``clip_grad_norm_`` first (when ``norm`` is set), then ``clip_grad_value_`` (when ``value`` is set)."""

    norm: NormClip | None = None
    value: float | None = None

    def eager_(self, params: Sequence[torch.Tensor]) -> bool:
        """Clip the ``.grad`` of ``params`` in place as a plain loop does. Returns False, leaving the
        gradients untouched, where ``error_if_nonfinite`` is set and the total norm is not finite (torch
        raises there; the caller skips the step and reports it)."""
        with torch.no_grad():
            grads = [p.grad for p in params if p.grad is not None]
            if self.norm is not None and grads:
                total = torch.nn.utils.get_total_norm(grads, self.norm.norm_type)
                if self.norm.error_if_nonfinite and not math.isfinite(total.item()):
                    return False
                torch.nn.utils.clip_grads_with_norm_(params, self.norm.max_norm, total)
            if self.value is not None:
                torch.nn.utils.clip_grad_value_(params, self.value)
        return True

    def traced(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The clipped gradient values, out of place (for tracing), and a boolean tensor that is False where
        ``error_if_nonfinite`` is set and the total norm is not finite (None when nothing is checked)."""
        finite = None
        if self.norm is not None and grads:
            total = torch.nn.utils.get_total_norm(grads, self.norm.norm_type, foreach=True)
            if self.norm.error_if_nonfinite:
                finite = torch.isfinite(total)
            clip_coef = torch.clamp(self.norm.max_norm / (total + 1e-6), max=1.0)
            grads = list(torch._foreach_mul(grads, clip_coef))
        if self.value is not None and grads:
            grads = list(torch._foreach_clamp_min(grads, -self.value))
            grads = list(torch._foreach_clamp_max(grads, self.value))
        return grads, finite


def nonfinite_norm_message(norm_type: float) -> str:
    """torch's error for a non-finite total norm under ``error_if_nonfinite=True``."""
    return (
        f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )


def check_clip(clip_grad_norm: Any, clip_grad_value: Any) -> GradClip | None:
    """``fit()``'s two clipping options, checked (errors name the argument): ``clip_grad_norm`` is a max
    norm, a tuple ``(max_norm[, norm_type[, error_if_nonfinite]])`` or a dict with those keys;
    ``clip_grad_value`` a positive number."""
    norm = None if clip_grad_norm is None else _check_norm(clip_grad_norm)
    value = None
    if clip_grad_value is not None:
        if isinstance(clip_grad_value, bool) or not isinstance(clip_grad_value, (int, float)):
            raise TypeError(f"clip_grad_value must be a number or None, got {type(clip_grad_value).__name__}")
        value = float(clip_grad_value)
        if not value > 0 or math.isinf(value):
            raise ValueError(f"clip_grad_value must be positive and finite, got {clip_grad_value}")
    return None if norm is None and value is None else GradClip(norm, value)


_NORM_KEYS = ("max_norm", "norm_type", "error_if_nonfinite")


def _check_norm(option: Any) -> NormClip:
    if isinstance(option, Mapping):
        unknown = set(option) - set(_NORM_KEYS)
        if unknown or "max_norm" not in option:
            raise ValueError(
                f"clip_grad_norm as a dict takes the keys {', '.join(_NORM_KEYS)} (max_norm required), "
                f"got {', '.join(sorted(map(str, option)))}"
            )
        args = dict(option)
    elif isinstance(option, (tuple, list)):
        if not 1 <= len(option) <= 3:
            raise ValueError(
                "clip_grad_norm as a tuple is (max_norm[, norm_type[, error_if_nonfinite]]), "
                f"got {len(option)} values"
            )
        args = dict(zip(_NORM_KEYS, option, strict=False))
    else:
        args = {"max_norm": option}
    max_norm = args["max_norm"]
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"clip_grad_norm's max_norm must be a number, got {type(max_norm).__name__}")
    if not max_norm >= 0 or math.isnan(max_norm):
        raise ValueError(f"clip_grad_norm's max_norm must be non-negative, got {max_norm}")
    norm_type = args.get("norm_type", 2.0)
    if isinstance(norm_type, str) and norm_type.lower() in ("inf", "-inf"):
        norm_type = float(norm_type)
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or math.isnan(norm_type):
        raise TypeError(f"clip_grad_norm's norm_type must be a number or 'inf', got {norm_type!r}")
    error_if_nonfinite = args.get("error_if_nonfinite", False)
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(
            f"clip_grad_norm's error_if_nonfinite must be a bool, got {type(error_if_nonfinite).__name__}"
        )
    return NormClip(float(max_norm), float(norm_type), error_if_nonfinite)


def stepped_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters ``optimizer`` steps, in its order: the ones hotloop clips."""
    return [p for group in optimizer.param_groups for p in group["params"]]
