"""JAX as a contender (optional: skipped unless ``jax`` and ``optax`` are installed).

What a performance-minded JAX user writes: one ``jax.jit``-ed epoch, a ``lax.scan`` over the epoch's batches
that gathers, runs forward and backward and applies optax's Adam (or SGD), all fused and planned by XLA. The
model is the workload's own, translated layer by layer from its PyTorch form with the same initial weights;
workloads beyond MLPs (Linear and elementwise activations) are skipped with the reason.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .loops import Data, Runner, Skip, installed
from .workloads import Workload

_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def _layers(model: nn.Module) -> list[tuple[str, object]]:
    """The model as a list of ("linear", (weight, bias)) and (activation, None), or Skip."""
    modules = list(model) if isinstance(model, nn.Sequential) else [model]
    layers: list[tuple[str, object]] = []
    for m in modules:
        if isinstance(m, nn.Linear) and m.bias is not None:
            layers.append(("linear", (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())))
        elif type(m) in _ACTIVATIONS:
            layers.append((_ACTIVATIONS[type(m)], None))
        else:
            kind = type(m).__name__
            raise Skip(f"the JAX contender translates MLPs only (Linear + activations), not {kind}")
    return layers


def _optax_optimizer(optimizer: torch.optim.Optimizer):  # noqa: ANN202 - optax types are optional
    import optax

    group = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.Adam and not group["weight_decay"] and not group["amsgrad"]:
        b1, b2 = group["betas"]
        return optax.adam(group["lr"], b1=b1, b2=b2, eps=group["eps"])
    if type(optimizer) is torch.optim.SGD and not group["weight_decay"] and not group["nesterov"]:
        return optax.sgd(group["lr"], momentum=group["momentum"] or None)
    raise Skip(f"the JAX contender maps plain Adam and SGD only, not this {type(optimizer).__name__}")


def _loss(loss_fn: nn.Module):  # noqa: ANN202
    import jax.numpy as jnp
    import optax

    if isinstance(loss_fn, nn.MSELoss):
        return lambda pred, y: jnp.mean((pred - y) ** 2)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return lambda pred, y: optax.softmax_cross_entropy_with_integer_labels(pred, y).mean()
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return lambda pred, y: optax.sigmoid_binary_cross_entropy(pred, y).mean()
    raise Skip(f"the JAX contender maps MSE, cross-entropy and BCE-with-logits, not {type(loss_fn).__name__}")


def jax_scan(w: Workload, data: Data, device: torch.device) -> Runner:
    """One ``jax.jit``-ed epoch (a ``lax.scan`` of gather, forward, backward, optax update) per window."""
    if not (installed("jax") and installed("optax")):
        raise Skip("jax and optax are not installed (pip install jax optax)")
    if device.type != "cpu":
        raise Skip("the JAX contender runs on the CPU only")
    if "jax" not in __import__("sys").modules:
        # XLA's CPU backend sizes its own thread pool: hold it to the bench's thread count
        threads = torch.get_num_threads()
        os.environ.setdefault(
            "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
            f"intra_op_parallelism_threads={threads}",
        )  # fmt: skip
    import jax
    import jax.numpy as jnp

    model, optimizer, loss_fn = w.build(device)
    layers = _layers(model)
    tx = _optax_optimizer(optimizer)
    loss_of = _loss(loss_fn)
    params = [(jnp.asarray(p[0]), jnp.asarray(p[1])) for kind, p in layers if kind == "linear"]
    kinds = [kind for kind, _ in layers]

    def forward(params, x):  # noqa: ANN001, ANN202
        linear = iter(params)
        for kind in kinds:
            if kind == "linear":
                weight, bias = next(linear)
                x = x @ weight + bias
            else:
                x = getattr(jax.nn, kind)(x)
        return x

    inputs, labels = (jnp.asarray(t.numpy()) for t in data)

    def step(carry, index):  # noqa: ANN001, ANN202
        params, state = carry
        loss, grads = jax.value_and_grad(lambda p: loss_of(forward(p, inputs[index]), labels[index]))(params)
        updates, state = tx.update(grads, state, params)
        return (jax.tree.map(lambda p, u: p + u, params, updates), state), loss

    @jax.jit
    def epoch(params, state, order):  # noqa: ANN001, ANN202
        (params, state), losses = jax.lax.scan(step, (params, state), order)
        return params, state, losses.mean()

    carry = [params, tx.init(params)]
    rng = np.random.default_rng(0)
    n = inputs.shape[0]

    def window() -> float:
        order = jnp.asarray(rng.permutation(n)[: w.steps * w.batch_size].reshape(w.steps, w.batch_size))
        carry[0], carry[1], loss = epoch(carry[0], carry[1], order)
        return float(loss)  # blocks until the epoch is done

    return Runner(window)
