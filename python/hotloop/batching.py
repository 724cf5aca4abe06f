"""Python-side batching, identical in order to what the native loop visits."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def iter_batches(
    *tensors: torch.Tensor,
    batch_size: int = 1,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned batches from tensors that share their first (sample) dimension.

    Shuffled order is ``torch.randperm(n, generator=generator)`` split by ``batch_size``, drawn on the
    first tensor's device; the last batch may be smaller. This is the order ``fit`` trains in.

    Example:
        >>> features = torch.arange(12).reshape(6, 2)
        >>> targets = torch.arange(6)
        >>> batches = iter_batches(features, targets, batch_size=4, shuffle=False)
        >>> x_batch, y_batch = next(batches)
        >>> x_batch.shape, y_batch.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """
    if not tensors:
        return
    if not shuffle:
        yield from zip(*(tensor.split(batch_size) for tensor in tensors), strict=True)
        return
    order = torch.randperm(tensors[0].shape[0], device=tensors[0].device, generator=generator)
    for index in order.split(batch_size):
        yield tuple(tensor[index] for tensor in tensors)
