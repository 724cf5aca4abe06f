"""Dropout anywhere, natively, with eager's random numbers: transposed tensors, attention, Transformers."""

from __future__ import annotations

import copy
import itertools
import warnings

import hotloop
import pytest
import torch
from conftest import assert_same_state, plain_loop_losses
from hotloop.eager_draws import memory_order
from torch import nn

F = nn.functional


class TransposedDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = F.dropout(self.lin(x).transpose(0, 1), 0.3, training=self.training).transpose(0, 1)
        return self.head(h).mean(1)


class Attention(nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.need_weights = need_weights

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=self.need_weights)[0].mean(1))


class Encoder(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, **options)  # dropout=0.1
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


MODELS = {
    "transposed dropout": TransposedDropout,
    "attention weights": lambda: Attention(True),
    "attention": lambda: Attention(False),
    "encoder layer": Encoder,
    "encoder layer gelu norm_first": lambda: Encoder(activation="gelu", norm_first=True),
    "encoder": lambda: nn.Sequential(
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, batch_first=False), 2, enable_nested_tensor=False
        ),
        nn.Flatten(),
        nn.Linear(5 * 8, 1),
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_native_dropout_trains_like_the_plain_loop(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    twin = copy.deepcopy(model)
    x, y = torch.randn(40, 5, 8), torch.randn(40, 1)
    # SGD: attention's key bias has a gradient that is rounding noise, which Adam scales up to full steps
    optimizer, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin))
    torch.manual_seed(7)
    stream = hotloop.fit(
        (x, y),
        model,
        optimizer,
        nn.MSELoss(),
        batch_size=16,
        engine="native",
        generator=torch.Generator().manual_seed(1),
    )
    events = list(itertools.islice(stream, 3))
    stream.close()
    torch.manual_seed(7)
    expected = plain_loop_losses(
        (x, y),
        twin,
        twin_opt,
        nn.MSELoss(),
        batch_size=16,
        steps=events[-1]["updates"],
        generator=torch.Generator().manual_seed(1),
    )
    assert [e["train_loss"] for e in events] == pytest.approx(expected, rel=1e-5)
    assert_same_state(model, twin, rtol=1e-4, atol=1e-6)


def test_auto_chooses_native_for_a_default_transformer_encoder_layer():
    torch.manual_seed(0)
    model = Encoder()
    stream = hotloop.fit(
        (torch.randn(32, 5, 8), torch.randn(32, 1)),
        model,
        torch.optim.AdamW(model.parameters()),
        nn.MSELoss(),
        batch_size=16,
    )
    assert next(stream)["engine"] == "native"
    stream.close()


def test_memory_order_is_the_order_empty_like_is_filled_in():
    t = torch.empty(4, 3, 8).transpose(0, 1)
    assert memory_order(t) == [1, 0, 2]
    assert memory_order(torch.empty(2, 1, 3)) == [0, 1, 2]
    assert memory_order(torch.empty(4, 1, 3).transpose(0, 2)) == [2, 1, 0]
    assert memory_order(torch.empty(3, 1).expand(3, 4)) == [0, 1]
    assert memory_order(torch.empty(1).expand(3, 4)) is None
    torch.manual_seed(0)
    eager = torch.empty_like(t).bernoulli_(0.5)
    torch.manual_seed(0)
    drawn = torch.bernoulli(torch.empty(4, 3, 8), 0.5).permute(1, 0, 2)
    assert torch.equal(eager, drawn)


def test_auto_does_not_choose_native_for_an_lstm_but_native_runs_it():
    class Recurrent(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.rnn = kind(8, 8, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    data = (torch.randn(32, 5, 8), torch.randn(32, 1))
    for kind, engine, expected in (
        (nn.LSTM, "auto", "python"),
        (nn.LSTM, "native", "native"),
        (nn.GRU, "auto", "native"),
    ):
        model = Recurrent(kind)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stream = hotloop.fit(
                data, model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), engine=engine
            )
            assert next(stream)["engine"] == expected
        stream.close()
        if expected == "python":
            assert any("nn.LSTM (rnn)" in str(w.message) for w in caught)
