"""hotloop: fast training loops for small PyTorch models on in-memory data.

``fit`` is a drop-in for ``fitstream.epoch_stream`` whose inner loop runs in C++.
"""

from __future__ import annotations

from .batching import iter_batches
from .engines import SlowPathWarning
from .events import Event
from .fit import FitStream, epoch_stream, fit

__version__ = "0.1.0"

__all__ = [
    "Event",
    "FitStream",
    "SlowPathWarning",
    "epoch_stream",
    "fit",
    "iter_batches",
]
