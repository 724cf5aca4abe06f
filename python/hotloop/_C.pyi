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
    def reuse_output(self, op: int, out_overload: str) -> None: ...
    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...
    @property
    def num_inputs(self) -> int: ...
    @property
    def num_outputs(self) -> int: ...
    @property
    def op_names(self) -> list[str]: ...
    @property
    def reused_ops(self) -> list[str]: ...

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

class ManyStep(DeviceStep):
    """fit_many's stacked step: the window's batch indices, the stacked joint graph, the update."""

    def __init__(
        self,
        step_graphs: Sequence[tuple[int, OpGraph]],
        step_inputs: Sequence[torch.Tensor],
        index_slot: int,
        applied: torch.Tensor,
        guard: bool,
        raise_on_nonfinite: bool,
    ) -> None: ...
    def set_updates(
        self,
        update_all: OpGraph,
        all_inputs: Sequence[torch.Tensor],
        update_rows: OpGraph,
        rows_inputs: Sequence[torch.Tensor],
        fresh: torch.Tensor | None,
        needs_fresh: torch.Tensor | None,
    ) -> None: ...
    def set_window(
        self,
        indices: Sequence[torch.Tensor],
        taking: Sequence[torch.Tensor | None],
        active: Sequence[bool],
    ) -> None: ...
    def set_row_optimizer(self, optimizer: RowOptimizer | None) -> None: ...
    @property
    def position(self) -> int: ...
    @property
    def active(self) -> list[bool]: ...
    @property
    def nonfinite_steps(self) -> list[int]: ...
    @property
    def raised_model(self) -> int: ...
    @property
    def raised_step(self) -> int: ...

class RowOptimizer:
    """fit_many's fused update over flat ``[K, P]`` rows with per-model hyperparameters."""

    def __init__(
        self,
        kind: str,
        param: torch.Tensor,
        last_grad: torch.Tensor,
        state: Sequence[torch.Tensor],
        maximize: bool,
        nesterov: bool,
        amsgrad: bool,
        decoupled: bool,
    ) -> None: ...
    def set_hypers(
        self,
        lr: Sequence[float],
        weight_decay: Sequence[float],
        momentum: Sequence[float],
        dampening: Sequence[float],
        beta1: Sequence[float],
        beta2: Sequence[float],
        eps: Sequence[float],
    ) -> None: ...
    def step(self, grad: torch.Tensor, on: Sequence[bool]) -> None: ...

class AotUpdate:
    """The update an aot package was compiled with."""

    SGD: AotUpdate
    Adam: AotUpdate
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class AotStep(DeviceStep):
    """Runs the AOTInductor package compiled for the batch size (forward, backward and update in one call)
    on the user's tensors; other batch sizes run on the native step."""

    def __init__(
        self,
        native: NativeStep,
        params: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        update: AotUpdate,
        state_lists: int,
        num_metrics: int,
    ) -> None: ...
    def add_package(self, batch_size: int, path: str) -> None: ...
    def clear_packages(self) -> None: ...
    @property
    def package_batch_sizes(self) -> list[int]: ...
    def bind(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor]) -> None: ...
    @property
    def compiled_steps(self) -> int: ...

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
