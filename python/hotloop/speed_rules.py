"""Models the native engine runs slower than eager, by a rule (never by a measurement, so the engine
``engine="auto"`` picks, and with it the results, cannot depend on the machine's load)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def slower_natively(model: nn.Module) -> str | None:
    """Why ``engine="auto"`` should not choose the native engine for ``model`` on the CPU, or None.

    ``nn.LSTM`` runs as one fused oneDNN kernel per layer in eager (``mkldnn_rnn_layer`` and its backward);
    traced under ``torch.func`` it is decomposed into several small ops per time step, and the native step
    measured 0.75x of the eager loop (bench/recipes.py). Tracing the fused kernel instead fails in torch
    2.13's fake-tensor rule for its backward. GRU and RNN have no fused CPU kernel: native is faster.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.LSTM):
            where = f" ({name})" if name else ""
            return (
                f"the model has an nn.LSTM{where}, whose fused CPU kernel the capture splits into "
                "per-time-step ops, which run slower than eager; pass engine='native' to run it natively"
            )
    return None


def channels_last_faster(model: nn.Module, device: torch.device) -> bool:
    """Whether ``memory_format="auto"`` runs ``model``'s native step in channels_last.

    On the CPU, oneDNN's convolutions and torch's pooling kernels run channels_last faster than contiguous
    NCHW: the benchmark CNN (two 3x3 convolutions, max-pooling, a linear head) took 1.6x less time per
    native step, and other small CNNs measured by ``bench/layouts.py`` gained too. A rule (an
    ``nn.Conv2d`` with floating-point weights, on the CPU) rather than a timing at capture: results, which
    round differently in each layout, must not depend on the machine's load.
    """
    if device.type != "cpu":
        return False
    return any(isinstance(m, nn.Conv2d) and m.weight.is_floating_point() for m in model.modules())


# torch's at::internal::GRAIN_SIZE: ATen splits no elementwise op or reduction over fewer elements
# across threads.
ONE_THREAD_BELOW = 32768
# Kernels that split even small work by the thread count, so that partial sums, and the rounding, depend
# on it: oneDNN's convolutions, and batch norm's statistics (one partial sum per thread over the batch).
# One thread would round differently from the user's loop on several.
_SPLIT_BY_THREADS = ("convolution", "mkldnn", "batch_norm")


def one_thread_suffices(largest_tensor: int, op_names: Iterable[str], device: torch.device) -> bool:
    """Whether a native window runs on one intra-op thread (the caller's setting is restored after
    it), given its graphs' largest tensor (elements) and ops.

    ATen's elementwise ops and reductions split no work this small across threads (``GRAIN_SIZE``), so
    more threads only add the cost of waking them (``bench/quick_wins.py threads``), and the results are
    those of any thread count. Graphs with convolutions or batch norm keep the user's threads: their
    kernels split even small work and sum differently for each count (tests/test_window_threads.py,
    tests/test_fidelity.py). A rule on the graph, not a timing, so the choice cannot depend on the
    machine's load.
    """
    if device.type != "cpu" or not 0 < largest_tensor < ONE_THREAD_BELOW:
        return False
    return not any(word in name for name in op_names for word in _SPLIT_BY_THREADS)
