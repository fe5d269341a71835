"""Ghost batch normalization (Hoffer et al. 2017, "Train longer, generalize better").

The model. Plain batch norm normalizes with the statistics of whatever batch reaches it, so
its noise, and the function the network learns, change when the local batch changes (a
bigger batch from the controller, more accumulation, fewer ranks). Ghost batch norm fixes
the batch the statistics come from: in training, the N examples of a forward pass are split
into k = ceil(N / virtual_batch_size) contiguous *ghost batches* of as equal sizes as
possible (sizes differ by at most one, none above ``virtual_batch_size``), and each ghost
batch is normalized with its own per-channel mean and biased variance, exactly as
``BatchNorm`` would normalize it alone. With N <= virtual_batch_size it is plain batch norm.

Running statistics are updated once per forward pass, like ``BatchNorm`` (same ``momentum``,
``None`` = cumulative average, ``num_batches_tracked`` + 1), from the ghost batches pooled:
the mean is the mean over all N examples (the size-weighted mean of the ghost means) and the
variance is the pooled unbiased within-ghost variance sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1),
the variance the training-time normalization actually used. With a single ghost batch both
equal plain batch norm's update. In eval mode the running statistics are used (when tracked),
so a trained model evaluates the same way as with ``BatchNorm``.

``GhostBatchNorm`` has the parameters and buffers of ``BatchNorm`` under the same names, and
accepts any input of ``BatchNorm1d/2d/3d`` (N, C, ...). ``convert_ghost_batch_norm`` swaps every
``BatchNorm1d/2d/3d`` of a module for one, sharing the same Parameter and buffer objects, so
the state_dict keys and shapes are unchanged and an optimizer built before the conversion
still holds the right parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm", "convert_ghost_batch_norm", "ghost_sizes"]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def ghost_sizes(n: int, virtual_batch_size: int, values_per_example: int = 1) -> list[int]:
    """Sizes of the ghost batches a batch of ``n`` examples is split into: ceil(n / vbs) parts
    differing by at most one; fewer parts when one would hold a single value per channel."""
    k = max(1, math.ceil(n / virtual_batch_size))
    while k > 1 and (n // k) * values_per_example < 2:
        k -= 1
    base, extra = divmod(n, k)
    return [base + 1 if i < extra else base for i in range(k)]


class GhostBatchNorm(_BatchNorm):
    """Batch norm over ghost batches of ``virtual_batch_size`` examples (module docstring)."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.virtual_batch_size = _check_vbs(virtual_batch_size)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GhostBatchNorm expects (N, C, ...) input, got {x.dim()}D")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        per_example = x[0, 0].numel() if x.shape[0] > 0 else 1
        sizes = ghost_sizes(x.shape[0], self.virtual_batch_size, per_example)
        chunks = x.split(sizes) if len(sizes) > 1 else (x,)
        out = [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
               for c in chunks]
        if self.training and self.track_running_stats:
            self._update_running_stats(chunks)
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.no_grad()
    def _update_running_stats(self, chunks) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:       # cumulative moving average, as BatchNorm does
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        dims = [0] + list(range(2, chunks[0].dim()))
        total, mean_sum, ss_within, dof = 0, 0.0, 0.0, 0
        for c in chunks:
            var, mean = torch.var_mean(c.detach(), dim=dims, correction=0)
            # fp32 sums: in fp16 (autocast) var * n passes 65504 at a few hundred examples.
            var, mean = var.float(), mean.float()
            n = c.numel() // c.shape[1]
            total += n
            mean_sum = mean_sum + mean * n
            ss_within = ss_within + var * n          # sum of squared deviations in the ghost
            dof += n - 1
        mean = mean_sum / total
        var = ss_within / max(dof, 1)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)


def _check_vbs(virtual_batch_size) -> int:
    vbs = int(virtual_batch_size)
    if vbs < 1 or vbs != virtual_batch_size:
        raise ValueError(f"virtual_batch_size must be a positive integer, got "
                         f"{virtual_batch_size!r}")
    return vbs


def convert_ghost_batch_norm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` by a ``GhostBatchNorm`` that shares its
    parameters and buffers; returns ``module`` (or the new layer when ``module`` is itself a
    batch norm). A ``GhostBatchNorm`` already there gets the new ``virtual_batch_size``."""
    vbs = _check_vbs(virtual_batch_size)
    if isinstance(module, GhostBatchNorm):
        module.virtual_batch_size = vbs
        return module
    if isinstance(module, _CONVERTIBLE):
        ghost = GhostBatchNorm(module.num_features, vbs, module.eps, module.momentum,
                               module.affine, module.track_running_stats, device="meta")
        if module.affine:
            ghost.weight, ghost.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(ghost, name, getattr(module, name))
        ghost.train(module.training)
        return ghost
    for name, child in module.named_children():
        new = convert_ghost_batch_norm(child, vbs)
        if new is not child:
            setattr(module, name, new)
    return module
