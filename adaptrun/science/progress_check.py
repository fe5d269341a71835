"""Did a batch move pay? The training progress per example a move realized, from the loss.

The model. Before a move the job trained at batch B_old; the loss it reported over examples
x follows L(x) = a + b log x over a short window (``fit_log_curve``: least squares, b < 0
while training makes progress). The policy moved to B_new predicting that an example there
is worth ``predicted`` = E(B_new) / E(B_old) examples at B_old (``efficiency``). Were that
true, the loss after the move at examples x > x0 would be

    L(x) = a + b log(x0 + rho (x - x0))          with rho = predicted.

``realized_ratio`` finds the rho the losses reported after the move fit best (a grid in log
rho, the curve's a and b held): the efficiency ratio the move realized. A move whose
realized ratio falls short of a fraction of the predicted one spent its examples for less
progress than the noise scale promised, and the policy backs it off (``Policy``).

Losses are per-report means of the script's training loss (``record_loss``); a script that
reports none gives no curve, and its moves go unchecked. Pure functions of lists of
(examples, loss) pairs; no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchMove", "fit_log_curve", "realized_ratio"]

_RHO_GRID = np.geomspace(0.01, 4.0, 481)


@dataclass(frozen=True)
class BatchMove:
    """A batch increase applied at ``examples`` (x0), and what it was predicted to do."""
    examples: float
    old_batch: int
    new_batch: int
    predicted: float          # E(new) / E(old) from the statistics it was decided on
    a: float                  # the curve before it: L = a + b log x
    b: float
    probe: bool = False       # a probe: kept only if it realizes ``keep_at`` or more
    keep_at: float = 0.0


def fit_log_curve(points) -> tuple[float, float] | None:
    """(a, b) of L = a + b log x fitted to (x, L) points with x > 0; None for fewer than 3
    points, a degenerate spread of x, or a curve that does not fall (by 0.1 % of the loss
    over the window)."""
    pts = [(x, y) for x, y in points if x > 0 and math.isfinite(y)]
    if len(pts) < 3:
        return None
    lx = np.log([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    if np.ptp(lx) <= 1e-9:
        return None
    b, a = np.polyfit(lx, y, 1)
    # Falling means by more than rounding: the fitted drop over the window is at least
    # 0.1 % of the loss (a flat loss fits a slope of -1e-16 as readily as +1e-16).
    drop = -b * float(np.ptp(lx))
    return (float(a), float(b)) if drop > 1e-3 * max(float(np.mean(np.abs(y))), 1e-12) else None


def realized_ratio(move: BatchMove, after) -> float:
    """The efficiency ratio rho that the (x, L) points reported after ``move`` fit best
    under the curve before it; nan without at least two points after it."""
    pts = [(x, y) for x, y in after if x > move.examples and math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    dx = np.array([p[0] for p in pts]) - move.examples
    y = np.array([p[1] for p in pts])
    pred = move.a + move.b * np.log(move.examples + _RHO_GRID[:, None] * dx[None, :])
    err = ((pred - y[None, :]) ** 2).sum(1)
    return float(_RHO_GRID[int(np.argmin(err))])
