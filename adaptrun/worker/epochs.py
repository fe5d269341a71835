"""``remaining_epochs(n)``: the epochs still to run, resuming at the restored one.

The current epoch is part of the job state (``adaptrun.worker.job`` in every snapshot). The
generator yields the epoch number from there; when the caller's loop body returns (the loader
was exhausted) the epoch counts as done. After the last epoch the job is finished: node-local
snapshots are removed and, when ``ADAPTRUN_CHECKPOINT_DIR`` is set, a final snapshot marks the
job complete, so a restart runs no epoch again.

The length of the run. ``by="epochs"`` (the default) runs ``n`` epochs whatever the batch.
``by="progress"`` runs until the training progress is that of ``n`` epochs at B0: ``n *
ceil(len(dataset) / B0)`` B0-steps, the wrapper's ``progress`` (each step adds its gain r, the
B0-steps it is worth; Pollux's and AdaScale's measure of a run's length). At B0, or at a
batch whose every example is fully efficient, that is ``n`` epochs; where a larger batch
makes an example worth less (E = r / s < 1) the run takes whole epochs more, so the model
ends as far trained as at B0, in fewer optimizer steps. Every rank reads the same progress
(it is computed from the all-reduced statistics), so every rank runs the same epochs. Every
step adds at least one B0-step (r >= 1), so the run ends by ``n * max_batch / B0`` epochs
at the latest. A schedule that should end with the run is keyed to the same progress
(``adaptrun.scaling.ProgressSchedule(..., by="progress")``).
"""
from __future__ import annotations

from typing import Iterator

from . import job

__all__ = ["remaining_epochs"]

_BY = ("epochs", "progress")


def remaining_epochs(num_epochs: int, by: str = "epochs") -> Iterator[int]:
    if by not in _BY:
        raise ValueError(f"remaining_epochs(by={by!r}): choose one of {_BY}")
    j = job.current("adaptrun.remaining_epochs")
    j.num_epochs = int(num_epochs)
    while j.state.epoch < num_epochs or (by == "progress" and not _progress_reached(j)):
        yield j.state.epoch
        j.end_epoch()
    j.finish()


def _progress_reached(j) -> bool:
    """The progress of ``num_epochs`` epochs at B0 is done (True without a wrapper or a
    loader: nothing measures progress, so the epochs decide)."""
    model, loader = j.parallel, j.loader
    if model is None or loader is None:
        return True
    return model.progress >= model._target_progress() - 1e-9
