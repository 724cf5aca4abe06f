"""hotloop: fast training loops for small PyTorch models on in-memory data.

``fit`` is a drop-in for ``fitstream.epoch_stream`` whose inner loop runs in C++.
"""

from __future__ import annotations

from . import _native
from ._shared import SlowPathWarning
from .batching import iter_batches
from .evaluation import BestModel, best_model, evaluate, validation_loss
from .events import Event
from .fit import FitStream, NonFiniteGradNormError, NonFiniteLossError, epoch_stream, fit
from .many import ManyStream, ModelList, fit_many, kfold
from .many_stages import BestModels, best_each, early_stop_each, evaluate_many, validation_loss_many
from .plotting import LivePlot, live_plot, plot_history
from .sinks import collect, collect_csv, collect_jsonl, collect_pd, tensorboard
from .stages import augment, early_stop, ema, pipe, print_keys, progress, take, tap, tick

__version__ = _native.VERSION

__all__ = [
    "Event",
    "FitStream",
    "NonFiniteGradNormError",
    "NonFiniteLossError",
    "SlowPathWarning",
    "epoch_stream",
    "fit",
    "iter_batches",
    # many models at once
    "BestModels",
    "ManyStream",
    "ModelList",
    "best_each",
    "early_stop_each",
    "evaluate_many",
    "fit_many",
    "kfold",
    "validation_loss_many",
    # stream toolkit
    "BestModel",
    "LivePlot",
    "augment",
    "best_model",
    "collect",
    "collect_csv",
    "collect_jsonl",
    "collect_pd",
    "early_stop",
    "ema",
    "evaluate",
    "live_plot",
    "pipe",
    "plot_history",
    "print_keys",
    "progress",
    "take",
    "tap",
    "tensorboard",
    "tick",
    "validation_loss",
]
