"""Layer-wise trust-ratio optimizers for very large batches: LARS and LAMB.

The model. At a very large batch the linearly scaled LR is too big for some layers and too
small for others: the ratio |w| / |g| differs by orders of magnitude between layers. Both
optimizers below rescale each parameter tensor's step by a *trust ratio* computed from the
norms of that tensor alone (|.| is the Euclidean norm over the whole tensor), so every layer
moves by about the same fraction of its own norm.

LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks"): SGD
with momentum m, weight decay wd, trust coefficient eta, global LR lr:

    d      = g + wd * w
    ratio  = eta * |w| / (|g| + wd * |w| + eps)      (ratio = 1 when |w| = 0 or |g| = 0)
    buf    = m * buf + ratio * d                     (buf = ratio * d at the first step)
    w      = w - lr * buf

The LR multiplies the momentum buffer from outside, as ``torch.optim.SGD`` does, so a new LR
(a scheduler, or ``AdaptiveDataParallel``'s per-step factor) applies to the whole step at
once; the paper puts lr inside the buffer, which is the same thing while lr is constant.

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes"): Adam moments with betas (b1, b2) and step count t, decoupled weight decay:

    m      = b1 * m + (1 - b1) * g
    v      = b2 * v + (1 - b2) * g^2
    m_hat  = m / (1 - b1^t),  v_hat = v / (1 - b2^t)   (m_hat = m, v_hat = v without
                                                        bias correction)
    u      = m_hat / (sqrt(v_hat) + eps) + wd * w
    ratio  = phi(|w|) / |u|,  phi = identity           (ratio = 1 when |w| = 0 or |u| = 0)
    w      = w - lr * ratio * u

The state names are ``torch.optim.Adam``'s (``step`` as a tensor, ``exp_avg``,
``exp_avg_sq``), so ``AdaptiveDataParallel`` measures the gradient noise on the
Adam-preconditioned gradient for LAMB as it does for Adam.

Which to use. LARS for SGD/momentum training of convolutional networks at global batches of
many thousands (ResNet-50 on ImageNet at 8k-32k), with the linear LR rule and a warmup. LAMB
for models trained with the Adam family (transformers, BERT pre-training at 32k-64k), with
the square-root LR rule and a warmup. At small batches neither is needed: plain SGD or AdamW
does as well.

Not adapted. Biases and normalization weights are usually left out of the trust ratio (and
of weight decay). Per param group, ``trust_adaptation=False`` turns the ratio off (ratio 1:
LARS becomes SGD with momentum and weight decay, LAMB becomes AdamW-style Adam with the decay
added to the update). For LARS, ``exclude_from_adaptation="1d"`` (or a predicate on the
tensor) leaves out every tensor with at most one dimension. Weight decay stays a separate,
per-group setting: put such parameters in a group with ``weight_decay=0`` to skip it too.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import torch
from torch.optim import Optimizer

__all__ = ["LARS", "LAMB", "trust_ratio"]

ExcludeRule = Union[None, str, Callable[[torch.Tensor], bool]]


def _norm(t: torch.Tensor) -> torch.Tensor:
    # Norms in float32 at least, so half-precision parameters do not overflow.
    return torch.linalg.vector_norm(t.detach().to(torch.promote_types(t.dtype, torch.float32)))


def trust_ratio(numerator: torch.Tensor, w_norm: torch.Tensor,
                update_norm: torch.Tensor) -> torch.Tensor:
    """``numerator`` where both norms are positive, else 1 (a 0-d tensor, no host sync)."""
    ok = (w_norm > 0) & (update_norm > 0)
    return torch.where(ok, numerator, torch.ones_like(numerator))


def _check_number(name: str, value, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number, got {value!r}; {hint}")
    return float(value)


def _check_nonnegative(name: str, value, hint: str) -> float:
    value = _check_number(name, value, hint)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}; {hint}")
    return value


def _check_unit_interval(name: str, value, hint: str) -> float:
    value = _check_number(name, value, hint)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}; {hint}")
    return value


def _check_trust_adaptation(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"trust_adaptation must be True or False, got {value!r}; pass "
                         "trust_adaptation=False in a param group to leave it unadapted")
    return value


class _TrustRatioOptimizer(Optimizer):
    """Shared plumbing: every param group (also one added later) is validated on entry."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def _grad(p: torch.Tensor, name: str) -> torch.Tensor:
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients; use a dense "
                               "embedding (sparse=False) or torch.optim.SparseAdam")
        return p.grad


class LARS(_TrustRatioOptimizer):
    """SGD with momentum and a per-tensor trust ratio (You et al. 2017); see the module doc.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``. A group may
            set ``trust_adaptation=False`` to leave its tensors unadapted.
        lr: the global learning rate (>= 0).
        momentum: in [0, 1); 0 means no momentum buffer.
        weight_decay: L2 coefficient wd (>= 0), inside the trust ratio as in the paper.
        trust_coefficient: eta (> 0), the fraction of |w| a layer may move per unit LR.
        eps: added to the ratio's denominator (>= 0).
        exclude_from_adaptation: ``None`` (adapt every tensor), ``"1d"`` (leave out tensors
            with at most one dimension: biases, norm weights), or a callable taking the
            parameter tensor and returning True to leave it out.

    State per parameter: ``momentum_buffer`` (as ``torch.optim.SGD``), when momentum > 0.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8,
                 exclude_from_adaptation: ExcludeRule = None):
        self._exclude = self._exclude_rule(exclude_from_adaptation)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, trust_adaptation=True)
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    @staticmethod
    def _exclude_rule(rule: ExcludeRule) -> Callable[[torch.Tensor], bool]:
        if rule is None:
            return lambda p: False
        if isinstance(rule, str):
            if rule != "1d":
                raise ValueError(f"exclude_from_adaptation must be None, '1d' or a callable "
                                 f"taking a parameter tensor, got {rule!r}")
            return lambda p: p.dim() <= 1
        if callable(rule):
            return rule
        raise ValueError(f"exclude_from_adaptation must be None, '1d' or a callable taking a "
                         f"parameter tensor, got {rule!r}")

    def _check_group(self, group: dict) -> None:
        _check_nonnegative("lr", group["lr"], "pass the global learning rate, e.g. lr=0.1")
        _check_unit_interval("momentum", group["momentum"],
                             "pass e.g. momentum=0.9, or 0 for none")
        _check_nonnegative("weight_decay", group["weight_decay"],
                           "pass e.g. weight_decay=5e-4, or 0 for none")
        eta = _check_number("trust_coefficient", group["trust_coefficient"],
                            "pass e.g. trust_coefficient=0.001")
        if eta <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {eta}; pass e.g. "
                             "trust_coefficient=0.001, or trust_adaptation=False in a param "
                             "group to turn the ratio off")
        _check_nonnegative("eps", group["eps"], "pass e.g. eps=1e-8")
        _check_trust_adaptation(group["trust_adaptation"])

    def adapted(self, p: torch.Tensor, group: dict) -> bool:
        """Whether ``p``'s step in ``group`` is scaled by the trust ratio."""
        return bool(group["trust_adaptation"]) and not self._exclude(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            wd, eta, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "LARS")
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()
                if self.adapted(p, group):
                    w_norm, g_norm = _norm(p), _norm(g)
                    ratio = trust_ratio(eta * w_norm / (g_norm + wd * w_norm + eps),
                                        w_norm, g_norm)
                    d.mul_(ratio.to(d.dtype))
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss


class LAMB(_TrustRatioOptimizer):
    """Adam moments with a per-tensor trust ratio (You et al. 2019); see the module doc.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``. A group may
            set ``trust_adaptation=False`` to leave its tensors unadapted.
        lr: the global learning rate (>= 0).
        betas: (b1, b2), each in [0, 1).
        eps: added to sqrt(v_hat) (>= 0).
        weight_decay: decoupled decay wd (>= 0), added to the Adam update before the ratio.
        bias_correction: divide the moments by (1 - b^t) as Adam does.

    State per parameter, named as in ``torch.optim.Adam``: ``step`` (a float32 0-d tensor),
    ``exp_avg`` (m), ``exp_avg_sq`` (v).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_adaptation=True)
        self._check_group(dict(defaults))
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        _check_nonnegative("lr", group["lr"], "pass the global learning rate, e.g. lr=1e-3")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}; pass e.g. "
                             "betas=(0.9, 0.999)")
        _check_unit_interval("betas[0]", betas[0], "pass e.g. betas=(0.9, 0.999)")
        _check_unit_interval("betas[1]", betas[1], "pass e.g. betas=(0.9, 0.999)")
        group["betas"] = (float(betas[0]), float(betas[1]))
        _check_nonnegative("eps", group["eps"], "pass e.g. eps=1e-6")
        _check_nonnegative("weight_decay", group["weight_decay"],
                           "pass e.g. weight_decay=0.01, or 0 for none")
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"bias_correction must be True or False, got "
                             f"{group['bias_correction']!r}")
        _check_trust_adaptation(group["trust_adaptation"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "LAMB")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                if group["bias_correction"]:
                    t = float(state["step"])
                    m_hat = m / (1.0 - beta1 ** t)
                    v_hat = v / (1.0 - beta2 ** t)
                else:
                    m_hat, v_hat = m, v
                u = m_hat / (v_hat.sqrt().add_(eps))
                if wd != 0:
                    u.add_(p, alpha=wd)
                if group["trust_adaptation"]:
                    w_norm, u_norm = _norm(p), _norm(u)
                    u.mul_(trust_ratio(w_norm / torch.where(u_norm > 0, u_norm, 1.0),
                                       w_norm, u_norm).to(u.dtype))
                p.add_(u, alpha=-lr)
        return loss
