"""What a training run shows and records: progress bar, epoch lines, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from cnn.files import atomic_write_text


class Reporter:
    """Reports epochs of a run in workdir; on resume, forgets epochs after the checkpoint."""

    def __init__(self, workdir: pathlib.Path, config, start_epoch: int = 0):
        self.workdir = pathlib.Path(workdir)
        self.config = config
        self.metrics_path = self.workdir / "metrics.jsonl"
        self._drop_epochs_after(start_epoch)
        self._bar = None
        self._tb = None
        if config.tensorboard:
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def _drop_epochs_after(self, epoch: int) -> None:
        """A run killed between its metrics line and its checkpoint redoes that epoch."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= epoch]
        if len(kept) != len(lines):
            atomic_write_text(self.metrics_path, "".join(f"{ln}\n" for ln in kept))

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.config.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=steps,
                desc=f"epoch {epoch}/{self.config.num_epochs}",
                unit="step",
                leave=False,
                file=sys.stderr,
            )

    def advance(self, steps: int) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def end_epoch(self, epoch: int, *, train, test, seconds, images_per_s, lr) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(
            f"epoch {epoch:3d}/{self.config.num_epochs}: train loss {train['loss']:.4f}"
            f" acc {train['acc']:.4f} | test loss {test['loss']:.4f} acc {test['acc']:.4f}"
            f" | {seconds:.1f} s, {images_per_s:,.0f} images/s",
            flush=True,
        )
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "seconds": seconds,
            "images_per_s": images_per_s,
            "learning_rate": lr,
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key in ("train_loss", "train_acc", "test_loss", "test_acc", "learning_rate"):
                self._tb.add_scalar(key.replace("_", "/", 1), record[key], epoch)
            self._tb.add_scalar("speed/images_per_s", images_per_s, epoch)
            self._tb.flush()

    def finish(self, result: dict) -> None:
        if self._tb is not None:
            self._tb.close()
        print(f"score: [{result['test_loss']:.4f}, {result['test_acc']:.4f}]", flush=True)
