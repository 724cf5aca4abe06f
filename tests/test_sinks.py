"""Sinks: collect, collect_jsonl, collect_pd, collect_csv and the tensorboard callback."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hotloop import collect, collect_csv, collect_jsonl, collect_pd, pipe, tap, tensorboard
from torch import nn

MODEL = nn.Linear(1, 1)


def events() -> list[dict[str, Any]]:
    return [
        {"model": MODEL, "step": 1, "train_loss": 0.5, "lr": 0.1},
        {"model": MODEL, "step": 2, "train_loss": 0.25, "val_loss": 0.4},
    ]


# collect ------------------------------------------------------------------------------------------------


def test_collect_drops_model_and_copies() -> None:
    source = events()
    out = collect(source)
    assert out == [
        {"step": 1, "train_loss": 0.5, "lr": 0.1},
        {"step": 2, "train_loss": 0.25, "val_loss": 0.4},
    ]
    out[0]["step"] = 99
    assert source[0]["step"] == 1


def test_collect_include_and_exclude() -> None:
    assert collect(events(), include=["val_loss", "step", "model"]) == [
        {"step": 1},
        {"val_loss": 0.4, "step": 2},
    ]
    assert collect(events(), exclude=["train_loss", "lr"]) == [{"step": 1}, {"step": 2, "val_loss": 0.4}]
    assert collect([]) == []


def test_collect_consumes_a_generator() -> None:
    gen = (e for e in events())
    assert len(collect(gen)) == 2
    assert list(gen) == []


@pytest.mark.parametrize("sink", [collect, collect_pd])
def test_filter_errors(sink: Any) -> None:
    with pytest.raises(ValueError, match=r"^Provide only one of include or exclude\.$"):
        sink([], include=["a"], exclude=["b"])
    with pytest.raises(TypeError, match="include must be a sequence of str"):
        sink([], include="step")
    with pytest.raises(TypeError, match="exclude must contain only str"):
        sink([], exclude=[1])


# collect_jsonl ------------------------------------------------------------------------------------------


def test_collect_jsonl_to_a_path_and_a_file(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    path.write_text("old content\n")
    collect_jsonl(events(), path, exclude=["lr"])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train_loss": 0.5},
        {"step": 2, "train_loss": 0.25, "val_loss": 0.4},
    ]
    buffer = io.StringIO()
    collect_jsonl(events(), buffer, include=["step"])
    assert buffer.getvalue() == '{"step": 1}\n{"step": 2}\n'
    collect_jsonl(events(), str(path), include=["train_loss"])
    assert path.read_text() == '{"train_loss": 0.5}\n{"train_loss": 0.25}\n'


def test_collect_jsonl_errors(tmp_path: Path) -> None:
    path = tmp_path / "keep.jsonl"
    path.write_text("keep\n")
    with pytest.raises(ValueError, match=r"^Provide only one of include or exclude\.$"):
        collect_jsonl(events(), path, include=["a"], exclude=["b"])
    assert path.read_text() == "keep\n"  # checked before the file is opened
    with pytest.raises(TypeError, match="dest must be a path or a text file"):
        collect_jsonl(events(), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON serializable"):
        collect_jsonl([{"t": torch.tensor(1.0)}], io.StringIO())


# collect_pd ---------------------------------------------------------------------------------------------


def test_collect_pd() -> None:
    pd = pytest.importorskip("pandas")
    frame = collect_pd(events())
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["step", "train_loss", "lr", "val_loss"]
    assert frame["step"].tolist() == [1, 2]
    assert collect_pd(events(), include=["step"]).columns.tolist() == ["step"]


def test_collect_pd_without_pandas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"^pandas is required for collect_pd\.$"):
        collect_pd(events())


# collect_csv --------------------------------------------------------------------------------------------


def test_collect_csv_header_is_the_union_in_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    stream = events() + [{"model": MODEL, "step": 3, "acc": torch.tensor(0.75), "note": "x,y"}]
    collect_csv(iter(stream), path)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["step", "train_loss", "lr", "val_loss", "acc", "note"],
        ["1", "0.5", "0.1", "", "", ""],
        ["2", "0.25", "", "0.4", "", ""],
        ["3", "", "", "", "0.75", "x,y"],
    ]


def test_collect_csv_filters_and_file_objects() -> None:
    buffer = io.StringIO()
    collect_csv(events(), buffer, include=["val_loss", "step", "model"])
    assert buffer.getvalue() == "val_loss,step\n,1\n0.4,2\n"
    buffer = io.StringIO()
    collect_csv(events(), buffer, exclude=["lr", "val_loss"])
    assert buffer.getvalue() == "step,train_loss\n1,0.5\n2,0.25\n"


def test_collect_csv_reads_back_with_pandas(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "run.csv"
    collect_csv(events(), path)
    frame = pd.read_csv(path)
    assert frame["train_loss"].tolist() == [0.5, 0.25]
    assert frame["val_loss"].isna().tolist() == [True, False]


def test_collect_csv_of_nothing_writes_an_empty_header() -> None:
    buffer = io.StringIO()
    collect_csv([], buffer)
    assert buffer.getvalue() == "\n"


def test_collect_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^Provide only one of include or exclude\.$"):
        collect_csv(events(), tmp_path / "x.csv", include=["a"], exclude=["b"])
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(TypeError, match="dest must be a path or a text file"):
        collect_csv(events(), None)  # type: ignore[arg-type]


# tensorboard --------------------------------------------------------------------------------------------


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    accumulator = accumulator_module.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_tensorboard_writes_chosen_keys_at_step(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    stream = [
        {"model": MODEL, "step": 1, "train_loss": 0.5, "val_loss": torch.tensor(0.75)},
        {"model": MODEL, "step": 3, "train_loss": 0.25, "engine": "python"},
    ]
    with tensorboard(tmp_path, keys=["train_loss", "val_loss"]) as callback:
        assert list(pipe(stream, tap(callback))) == stream
        # each event is flushed: readable before close
        assert read_scalars(tmp_path)["train_loss"] == [(1, 0.5), (3, 0.25)]
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"train_loss", "val_loss"}
    assert scalars["val_loss"] == [(1, 0.75)]


def test_tensorboard_default_writes_every_numeric_key(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    callback = tensorboard(str(tmp_path))
    callback({"model": MODEL, "step": 2, "train_loss": 0.5, "updates": 8, "engine": "python", "ok": True})
    callback.close()
    assert read_scalars(tmp_path) == {"train_loss": [(2, 0.5)], "updates": [(2, 8.0)]}


def test_tensorboard_rejects_non_numeric_chosen_keys(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with tensorboard(tmp_path, keys=["engine"]) as callback:
        with pytest.raises(TypeError, match=r"event\['engine'\] must be a number"):
            callback({"step": 1, "engine": "python"})


def test_tensorboard_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="log_dir must be a path"):
        tensorboard(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be a sequence of str"):
        tensorboard(tmp_path, keys="train_loss")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tensorboard(tmp_path)
