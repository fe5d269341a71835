"""``remaining_epochs(n)``: the epochs still to run, resuming at the restored one.

The current epoch is part of the job state (``adaptrun.worker.job`` in every snapshot). The
generator yields the epoch number from there; when the caller's loop body returns (the loader
was exhausted) the epoch counts as done. After the last epoch the job is finished: node-local
snapshots are removed and, when ``ADAPTRUN_CHECKPOINT_DIR`` is set, a final snapshot marks the
job complete, so a restart runs no epoch again.
"""
from __future__ import annotations

from typing import Iterator

from . import job

__all__ = ["remaining_epochs"]


def remaining_epochs(num_epochs: int) -> Iterator[int]:
    j = job.current("adaptrun.remaining_epochs")
    j.num_epochs = int(num_epochs)
    while j.state.epoch < num_epochs:
        yield j.state.epoch
        j.end_epoch()
    j.finish()
