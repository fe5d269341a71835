"""Did a batch move pay? The training progress per example a move realized, from the loss.

The model. Before a move the job trained at batch B_old; the loss it reported over examples
x follows L(x) = a + b log x over a short window (``fit_log_curve``: least squares, b < 0
while training makes progress, with the scatter of the reports about it). The policy moved
to B_new predicting that an example there is worth ``predicted`` = E(B_new) / E(B_old)
examples at B_old (``efficiency``). Were that true, the loss after the move at examples
x > x0 would be

    L(x) = a + b log(x0 + rho (x - x0))          with rho = predicted.

``realized_interval`` finds the rho the losses reported after the move fit best (a grid in
log rho, the curve's a and b held): the efficiency ratio the move realized, and the range of
rho the reports support. The range is that of a least-squares profile at ``z`` standard
errors: the reports' own scatter (the larger of the one before the move and the one after
it), and the curve's error where it is extrapolated (its level there moved by ``z`` of its
standard error either way, the reports after the move sharing that one error). The policy
acts on the side of the range that is known (``Policy``): a move the statistics predicted is
backed off only when even the top of the range falls short; a probe, which the statistics did
not predict, is kept only when the bottom of the range delivers.

Losses are per-report means of the script's training loss (``record_loss``); a script that
reports none gives no curve, and its moves go unchecked. Pure functions of lists of
(examples, loss) pairs; no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchMove", "LogCurve", "fit_log_curve", "realized_ratio", "realized_interval"]

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
    sigma: float = 0.0        # the reports' scatter about that curve (0: not known)
    lx_mean: float = 0.0      # mean of log x over the curve's points
    sxx: float = 0.0          # their sum of squared deviations (0: the curve's error unknown)
    points: int = 0           # how many points the curve was fitted to


@dataclass(frozen=True)
class LogCurve:
    """L = a + b log x fitted by least squares to ``points`` reports, with ``sigma`` their
    residual standard deviation (n - 2 degrees of freedom), and the spread of log x the
    curve's standard error at another x needs (``sd_at``)."""
    a: float
    b: float
    sigma: float
    lx_mean: float
    sxx: float
    points: int

    def sd_at(self, lx) -> float:
        """Standard error of the fitted level at log x = ``lx`` (mean over an array)."""
        lx = np.atleast_1d(np.asarray(lx, dtype=np.float64))
        return float(self.sigma * math.sqrt(1.0 / self.points
                                            + float(np.mean((lx - self.lx_mean) ** 2))
                                            / self.sxx))


def fit_log_curve(points) -> LogCurve | None:
    """L = a + b log x fitted to (x, L) points with x > 0; None for fewer than 3 points, a
    degenerate spread of x, or a curve that does not fall (by 0.1 % of the loss over the
    window)."""
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
    if not drop > 1e-3 * max(float(np.mean(np.abs(y))), 1e-12):
        return None
    resid = y - (a + b * lx)
    sigma = math.sqrt(float(resid @ resid) / (len(y) - 2)) if len(y) > 2 else 0.0
    return LogCurve(float(a), float(b), sigma, float(lx.mean()),
                    float(((lx - lx.mean()) ** 2).sum()), len(y))


def realized_ratio(move: BatchMove, after) -> float:
    """The efficiency ratio rho that the (x, L) points reported after ``move`` fit best
    under the curve before it; nan without at least two points after it."""
    return realized_interval(move, after)[1]


def realized_interval(move: BatchMove, after, z: float = 1.0) -> tuple[float, float, float]:
    """(low, best, high) of the efficiency ratio rho the (x, L) points reported after
    ``move`` support at ``z`` standard errors (see the module docstring; the grid spans
    0.01-4, so its ends mean "at most" and "at least"); nans without two points after it.
    A move whose curve carries no scatter (``sigma`` 0) and whose reports fit exactly has a
    range of its best rho alone."""
    pts = [(x, y) for x, y in after if x > move.examples and math.isfinite(y)]
    if len(pts) < 2:
        return math.nan, math.nan, math.nan
    dx = np.array([p[0] for p in pts]) - move.examples
    y = np.array([p[1] for p in pts])
    xs = move.examples + _RHO_GRID[:, None] * dx[None, :]
    pred = move.a + move.b * np.log(xs)
    err = ((pred - y[None, :]) ** 2).sum(1)
    i = int(np.argmin(err))
    best = float(_RHO_GRID[i])
    var = max(move.sigma ** 2, float(err[i]) / max(len(y) - 1, 1))
    shift = 0.0
    if move.sxx > 0 and move.points > 0 and move.sigma > 0:
        curve = LogCurve(move.a, move.b, move.sigma, move.lx_mean, move.sxx, move.points)
        shift = z * curve.sd_at(np.log(xs[i]))
    lo, hi = best, best
    for s in (-shift, 0.0, shift) if shift > 0 else (0.0,):
        e = ((pred + s - y[None, :]) ** 2).sum(1)
        ok = _RHO_GRID[e - e.min() <= z * z * var]
        lo, hi = min(lo, float(ok.min())), max(hi, float(ok.max()))
    return lo, best, hi
