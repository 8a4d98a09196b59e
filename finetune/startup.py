"""Where the time before the first training step goes (scan, split, model, plan, first batch): RUN/startup.json
and one console line, so that a slow start points at its cause."""
from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info


class StartupTimer(pl.Callback):
    """``mark(phase)`` after each start-up phase; the phase from the last mark to the first training batch is
    'first_batch' (loaders, workers, the first images read)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.run = None

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(self.phases.get(phase, 0.0) + now - self.last, 3)
        self.last = now

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if "first_batch" in self.phases:
            return
        self.mark("first_batch")
        total = round(self.last - self.start, 3)
        if trainer.is_global_zero and self.run is not None:
            self.run.write_json("startup.json", {"to_first_step_s": total, "phases_s": self.phases}, replace=True)
        rank_zero_info(f"first training step after {total:.1f} s: "
                       + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()))
