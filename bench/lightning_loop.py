"""PyTorch Lightning's Trainer as a contender: its own loop runs in a thread that pauses between windows."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

import torch

from .loops import Data, Runner, Skip, installed, tensor_loader
from .workloads import Workload


def lightning_trainer(w: Workload, data: Data, device: torch.device) -> Runner:
    """``Trainer.fit`` on a ``DataLoader(TensorDataset)``, paused every ``w.steps`` optimizer steps."""
    if not installed("lightning"):
        raise Skip("lightning is not installed (pip install lightning)")
    import lightning as L

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model, optimizer, loss_fn = w.build(device)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            *inputs, labels = batch
            return loss_fn(self.net(*inputs), labels)

        def configure_optimizers(self):
            return optimizer

    gate = _Gate(w.steps, device)
    accelerator, devices = ("gpu", [device.index or 0]) if device.type == "cuda" else ("cpu", 1)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, max_epochs=-1, max_steps=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[gate.callback(L.Callback)],
    )  # fmt: skip
    loader = tensor_loader(data, w.batch_size)
    threads = torch.get_num_threads()

    def train() -> None:
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the DataLoader-workers and logging advice
            trainer.fit(Module(), loader)

    gate.start(train)
    return Runner(gate.window, gate.stop)


class _Stop(Exception):
    pass


class _Gate:
    """Hands control back and forth: ``window()`` lets the training thread run ``steps`` steps and waits."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None
        self.finished = self.stopping = False
        self.total, self.samples, self.loss = torch.zeros((), device=device), 0, float("nan")

    def callback(self, base: type) -> object:
        gate = self

        class Gate(base):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step % gate.steps == 0:
                    gate.pause(finished_window=trainer.global_step > 0)

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                gate.total += outputs["loss"].detach() * batch[0].shape[0]
                gate.samples += batch[0].shape[0]

        return Gate()

    def start(self, train: Callable[[], None]) -> None:
        def body() -> None:
            try:
                train()
            except _Stop:
                pass
            except BaseException as exc:  # handed to the harness by window()
                self.error = exc
            finally:
                self.finished = True
                self.done.release()

        self.thread = threading.Thread(target=body, name="bench-lightning", daemon=True)
        self.thread.start()

    def pause(self, finished_window: bool) -> None:
        if finished_window:
            self.loss = (self.total / self.samples).item()
            self.total.zero_()
            self.samples = 0
            self.done.release()
        self.go.acquire()
        if self.stopping:
            raise _Stop

    def window(self) -> float:
        self.go.release()
        if not self.done.acquire(timeout=600):
            raise TimeoutError("Lightning's training thread ran no window in 10 minutes")
        if self.finished:
            raise RuntimeError(f"Lightning's training stopped: {self.error!r}") from self.error
        return self.loss

    def stop(self) -> None:
        if not self.finished:
            self.stopping = True
            self.go.release()
            self.thread.join(timeout=30)
