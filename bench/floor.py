"""The floor row: the whole training step as one ``torch.compile(fullgraph=True)`` graph.

What the best ``torch.compile`` user writes: the step is a function of tensors — gather, forward and loss
through ``torch.func.functional_call``, backward through ``torch.func.grad_and_value``, the optimizer update
written out on the parameter and state tensors (torch.optim's formulas, the step count a tensor), the
window's loss sum — compiled once with ``fullgraph=True`` (no graph breaks), ``mode="reduce-overhead"``
(CUDA graphs) on CUDA. Compilation happens in the harness's untimed warm-up window. The model's own
parameters are updated in place, so it trains the same weights as the eager loop, on the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .loops import Data, Runner, Skip, generator
from .workloads import Workload

Update = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None]


def _adam(group: dict, step: torch.Tensor) -> tuple[Callable[[torch.Tensor], dict], Update]:
    """torch.optim.Adam's single-tensor update with a tensor step count (as its capturable path)."""
    if group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay"):
        raise Skip("written for plain Adam (no amsgrad, maximize or decoupled weight decay)")
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]

    def init(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def update(p: torch.Tensor, grad: torch.Tensor, s: dict[str, torch.Tensor]) -> None:
        if decay:
            grad = grad.add(p, alpha=decay)
        s["exp_avg"].lerp_(grad, 1 - beta1)
        s["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (s["exp_avg_sq"].sqrt() / (1 - beta2**step).sqrt()).add_(eps)
        p.sub_(step_size * s["exp_avg"] / denom)

    return init, update


def _sgd(group: dict, step: torch.Tensor) -> tuple[Callable[[torch.Tensor], dict], Update]:
    """torch.optim.SGD's update; a zero momentum buffer at step 1 gives torch's ``buf = grad``."""
    if group["dampening"] or group["maximize"]:
        raise Skip("written for SGD without dampening or maximize")
    lr, momentum, decay, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]

    def init(p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(p)} if momentum else {}

    def update(p: torch.Tensor, grad: torch.Tensor, s: dict[str, torch.Tensor]) -> None:
        if decay:
            grad = grad.add(p, alpha=decay)
        if momentum:
            buf = s["momentum_buffer"].mul_(momentum).add_(grad)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.sub_(lr * grad)

    return init, update


OPTIMIZERS = {torch.optim.Adam: _adam, torch.optim.SGD: _sgd}


def _indices(n: int, batch_size: int, g: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """The eager loop's batch indices: randperm split by batch_size, epoch after epoch."""
    while True:
        yield from torch.randperm(n, device=device, generator=g).split(batch_size)


def compiled_step(w: Workload, data: Data, device: torch.device) -> Runner:
    model, optimizer, loss_fn = w.build(device)
    make = OPTIMIZERS.get(type(optimizer))
    if make is None or len(optimizer.param_groups) != 1:
        raise Skip(f"the functional update is written for one group of {[o.__name__ for o in OPTIMIZERS]}")
    if any(True for _ in model.buffers()):
        raise Skip("written for models without buffers")
    step = torch.zeros((), device=device)
    init, update = make(optimizer.param_groups[0], step)
    # Detached views share the model's storage: the in-place updates train the model itself.
    params = {name: p.detach() for name, p in model.named_parameters()}
    states = {name: init(p) for name, p in params.items()}
    total = torch.zeros((), device=device)

    def train_step(index: torch.Tensor) -> None:
        *inputs, labels = (t[index] for t in data)

        def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(torch.func.functional_call(model, p, tuple(inputs)), labels)

        grads, loss = torch.func.grad_and_value(loss_of)(params)
        step.add_(1)
        for name, p in params.items():
            update(p, grads[name], states[name])
        total.add_(loss.detach() * index.shape[0])

    cuda = device.type == "cuda"
    if cuda:  # tensors that keep their address across replays: CUDA graphs may update them in place
        for t in [step, total, *data, *params.values(), *(s for st in states.values() for s in st.values())]:
            torch._dynamo.mark_static_address(t)
    torch._dynamo.reset()  # a fresh recompile budget for every workload
    compiled = torch.compile(train_step, fullgraph=True, mode="reduce-overhead" if cuda else "default")
    n = data[0].shape[0]
    indices = _indices(n, w.batch_size, generator(device), device)

    def run() -> float:
        total.zero_()
        for _ in range(w.steps):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            compiled(next(indices))
        return (total / (w.steps * w.batch_size)).item()

    return Runner(run)
