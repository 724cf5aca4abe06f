"""The native data path visits exactly the batches fitstream's iter_batches would."""

from __future__ import annotations

import pytest
import torch
from hotloop import iter_batches
from hotloop._native import _C
from hypothesis import given, settings
from hypothesis import strategies as st


def native_epochs(
    tensors, batch_size, *, shuffle=True, drop_last=False, generator=None, epochs=1, reuse=False
):
    dataset = _C.Dataset(tensors, batch_size, shuffle, drop_last, generator, reuse)
    out = []
    for _ in range(epochs * dataset.batches_per_epoch):
        out.append([t.clone() for t in dataset.next_batch()])
    return out


def test_shuffled_batches_follow_randperm_split_each_epoch():
    x = torch.arange(23 * 3, dtype=torch.float32).reshape(23, 3)
    y = torch.arange(23)
    batches = native_epochs([x, y], 5, generator=torch.Generator().manual_seed(7), epochs=3)
    reference = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(3):
        for index in torch.randperm(23, generator=reference).split(5):
            expected.append([x[index], y[index]])
    assert len(batches) == len(expected) == 15
    for got, want in zip(batches, expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_default_generator_is_consumed_like_torch_randperm():
    y = torch.arange(10)
    torch.manual_seed(3)
    got = torch.cat([b[0] for b in native_epochs([y], 4)])
    torch.manual_seed(3)
    assert torch.equal(got, torch.randperm(10))


def test_matches_iter_batches():
    x = torch.randn(17, 2)
    ours = native_epochs([x], 4, generator=torch.Generator().manual_seed(1))
    theirs = list(iter_batches(x, batch_size=4, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ours, theirs, strict=True))


def test_unshuffled_keeps_order_and_drop_last_skips_the_tail():
    y = torch.arange(10)
    assert [b[0].tolist() for b in native_epochs([y], 4, shuffle=False)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    assert [b[0].tolist() for b in native_epochs([y], 4, shuffle=False, drop_last=True)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]


def test_reused_buffers_hold_the_same_values():
    x = torch.randn(30, 4)
    fresh = native_epochs([x], 8, generator=torch.Generator().manual_seed(2), epochs=2)
    reused = native_epochs([x], 8, generator=torch.Generator().manual_seed(2), epochs=2, reuse=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh, reused, strict=True))


def test_any_dtypes_and_shapes_stay_aligned():
    n = 12
    ids = torch.arange(n)
    images = ids.view(n, 1, 1, 1).expand(n, 1, 2, 2).to(torch.float16)
    flags = ids % 2 == 0
    for ids_b, img_b, flag_b in native_epochs(
        [ids, images, flags], 5, generator=torch.Generator().manual_seed(0)
    ):
        assert torch.equal(img_b[:, 0, 0, 0].long(), ids_b)
        assert torch.equal(flag_b, ids_b % 2 == 0)
        assert img_b.dtype == torch.float16 and flag_b.dtype == torch.bool


@pytest.mark.parametrize(
    ("tensors", "batch_size", "message"),
    [
        ([torch.zeros(3), torch.zeros(4)], 1, "train_data\\[0\\] has 3, train_data\\[1\\] has 4"),
        ([torch.zeros(0)], 1, "zero samples"),
        ([torch.zeros(3)], 0, "batch_size must be >= 1"),
        ([torch.tensor(1.0)], 1, "0-dim"),
    ],
)
def test_bad_input_is_reported_not_crashed_on(tensors, batch_size, message):
    with pytest.raises(RuntimeError, match=message):
        _C.Dataset(tensors, batch_size, True, False, None, False)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 70),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_sample_exactly_once_per_epoch(n, batch_size, shuffle, drop_last, seed):
    if drop_last and batch_size > n:
        return
    ids = torch.arange(n)
    dataset = _C.Dataset([ids], batch_size, shuffle, drop_last, torch.Generator().manual_seed(seed), False)
    for _epoch in range(2):
        seen = [dataset.next_batch()[0].clone() for _ in range(dataset.batches_per_epoch)]
        assert all(b.numel() == batch_size for b in seen[:-1])
        visited = torch.cat(seen)
        if drop_last:
            assert visited.numel() == (n // batch_size) * batch_size
            assert visited.unique().numel() == visited.numel()
        else:
            assert torch.equal(visited.sort().values, ids)
