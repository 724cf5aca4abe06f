# Type stub for hotloop._C, the compiled extension (csrc/bindings.cpp). Keep in step with the bindings:
# tests/test_native.py checks that every name the module exports appears here.
from collections.abc import Callable, Sequence
from typing import Any

import torch

TORCH_VERSION: str
WITH_CUDA: bool

class Dataset:
    """Aligned tensors on one device, the epoch permutation and the batch gather."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        generator: torch.Generator | None,
        reuse_buffers: bool,
    ) -> None: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def batches_per_epoch(self) -> int: ...
    @property
    def epochs_completed(self) -> int: ...
    @property
    def batch_index(self) -> int: ...
    @property
    def epoch_order(self) -> torch.Tensor: ...
    def next_batch(self) -> list[torch.Tensor]: ...
    def next_indices(self) -> torch.Tensor: ...
    def restore(self, order: torch.Tensor, batch_index: int, epochs_completed: int) -> None: ...
    def set_shard(self, world: int, rank: int, seed: int, drop_tail: bool) -> None: ...
    @property
    def shard_samples(self) -> int: ...

class HostStep:
    """A step that trains on batches the Loop gathers; the Loop reads each loss (abstract)."""

class DeviceStep:
    """A step that takes its own batches and accounts its window on its device, read once per window
    (abstract)."""

class PythonStep(HostStep):
    """Calls ``step_fn(*batch)`` (holding the GIL) once per batch."""

    def __init__(self, step_fn: Callable[..., Any]) -> None: ...

class WindowStats:
    @property
    def loss_sum(self) -> float: ...
    @property
    def samples(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def metric_sums(self) -> list[float]: ...
    @property
    def nonfinite_step(self) -> int: ...

class Loop:
    def __init__(self, dataset: Dataset, step: HostStep | DeviceStep) -> None: ...
    def run(self, max_steps: int, stop_at_epoch_end: bool) -> WindowStats: ...
    def request_interrupt(self) -> None: ...
    def clear_interrupt(self) -> None: ...
    def set_guard_nonfinite(self, guard: bool) -> None: ...
    @property
    def total_steps(self) -> int: ...
    @staticmethod
    def live_count() -> int: ...

class OpGraph:
    """A captured joint forward+backward graph as a flat list of dispatcher calls over numbered slots."""

    def __init__(self, num_inputs: int) -> None: ...
    def reserve_slots(self, count: int) -> None: ...
    def set_constant(self, slot: int, value: torch.Tensor) -> None: ...
    def add_op(
        self,
        name: str,
        overload: str,
        args: list[tuple[Any, ...]],
        results: Sequence[int],
        release: Sequence[int],
        unpacked_list_size: int,
    ) -> None: ...
    def set_outputs(self, slots: Sequence[int], copy: Sequence[bool]) -> None: ...
    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...
    @property
    def num_inputs(self) -> int: ...
    @property
    def num_outputs(self) -> int: ...
    @property
    def op_names(self) -> list[str]: ...

class Evaluator:
    """Batched no-grad evaluation: one captured forward+metrics graph per batch size, run over consecutive
    slices of ``data`` with the metrics summed on the device (hotloop.native_eval)."""

    def __init__(
        self,
        graphs: Sequence[tuple[int, OpGraph]],
        model_tensors: Sequence[torch.Tensor],
        data: Sequence[torch.Tensor],
        batch_size: int,
    ) -> None: ...
    def bind(self, model_tensors: Sequence[torch.Tensor]) -> None: ...
    def run(self) -> list[float]: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def num_metrics(self) -> int: ...
    @property
    def batches_run(self) -> int: ...

class NativeStep(DeviceStep):
    """Runs the captured graph for the batch size, sets ``.grad`` and steps a native optimizer."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        state: Sequence[torch.Tensor],
        graphs: Sequence[tuple[int, OpGraph]],
        sample_shapes: Sequence[Sequence[int]],
        accumulate: Sequence[bool],
        optimizer: NativeOptimizer,
    ) -> None: ...
    def bind(self, params: Sequence[torch.Tensor], state: Sequence[torch.Tensor]) -> None: ...
    def set_accumulate(self, accumulate: Sequence[bool]) -> None: ...
    def set_graphs(self, graphs: Sequence[tuple[int, OpGraph]]) -> None: ...
    window_threads: int  # at most this many intra-op threads in a window (0: the caller's setting)
    @property
    def steps(self) -> int: ...
    @property
    def optimizer(self) -> NativeOptimizer: ...

class OptimizerGroup:
    params: list[torch.Tensor]
    grad_index: list[int]
    lr: float
    lr_per_step: list[float]
    momentum_per_step: list[float]
    weight_decay: float
    maximize: bool
    momentum: float
    dampening: float
    nesterov: bool
    momentum_buffers: list[torch.Tensor]
    buffer_is_new: list[bool]
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    decoupled_weight_decay: bool
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    state: dict[str, list[torch.Tensor]]  # the optimizers after Adam: state lists by torch.optim's keys
    options: dict[str, float]  # and their other hyperparameters by name
    def __init__(self) -> None: ...

class NativeOptimizer:
    def configure(self, groups: Sequence[OptimizerGroup], num_grads: int) -> None: ...
    def step(self, grads: Sequence[torch.Tensor]) -> None: ...
    @property
    def fused(self) -> bool: ...
    @property
    def steps_in_window(self) -> int: ...
    @property
    def groups(self) -> list[OptimizerGroup]: ...

class SGD(NativeOptimizer):
    def __init__(self, fused: bool = True) -> None: ...

class Adam(NativeOptimizer):
    def __init__(self, fused: bool = True) -> None: ...

class Adagrad(NativeOptimizer):
    def __init__(self, fused: bool = True) -> None: ...

class RMSprop(NativeOptimizer): ...
class Adamax(NativeOptimizer): ...
class NAdam(NativeOptimizer): ...
class RAdam(NativeOptimizer): ...
class ASGD(NativeOptimizer): ...
class Rprop(NativeOptimizer): ...
class Adadelta(NativeOptimizer): ...

# Graph engine: only in builds with CUDA (WITH_CUDA).

class GraphStep(DeviceStep):
    """A training step captured as CUDA graphs (one per batch size), replayed from C++ (cuda_graph.py)."""

    def __init__(
        self,
        graphs: Sequence[torch.cuda.CUDAGraph],
        index_buffers: Sequence[torch.Tensor],
        sums: torch.Tensor,
        found_inf: torch.Tensor,
        guard_nonfinite: bool,
        keep_alive: Sequence[torch.Tensor],
    ) -> None: ...
    @property
    def replays(self) -> int: ...
    @staticmethod
    def account_step(
        loss: torch.Tensor,
        metrics: torch.Tensor | None,
        sums: torch.Tensor,
        found_inf: torch.Tensor,
        weight: float,
        guard: bool,
    ) -> None: ...
