"""LARS and LAMB against updates worked out by hand or recomputed independently in numpy."""
import io
import sys

import numpy as np
import pytest
import torch

from adaptrun.worker.optim import LAMB, LARS

# A 2-tensor model: a weight matrix and a bias vector, with fixed gradients per step.
W0 = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
B0 = np.array([0.3, -0.2])
GRADS = [
    (np.array([[0.1, 0.2, -0.3], [0.05, -0.4, 0.6]]), np.array([0.02, -0.5])),
    (np.array([[-0.2, 0.1, 0.4], [0.3, 0.0, -0.1]]), np.array([0.1, 0.3])),
    (np.array([[0.05, -0.05, 0.2], [-0.1, 0.2, 0.15]]), np.array([-0.2, 0.05])),
    (np.array([[0.3, 0.1, -0.1], [0.0, -0.2, 0.25]]), np.array([0.07, -0.01])),
]


def _params(*arrays):
    return [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return [p.detach().numpy().copy() for p in params]


def _np_lars(ws, grads, lr, momentum, wd, eta, eps, adapt=None):
    """LARS in numpy (You et al. 2017, Alg. 1, with lr outside the buffer)."""
    ws = [w.copy() for w in ws]
    adapt = adapt or [True] * len(ws)
    bufs = [None] * len(ws)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            w = ws[i]
            d = g + wd * w
            if adapt[i]:
                wn, gn = np.sqrt(np.sum(w * w)), np.sqrt(np.sum(g * g))
                ratio = eta * wn / (gn + wd * wn + eps) if wn > 0 and gn > 0 else 1.0
                d = ratio * d
            bufs[i] = d if bufs[i] is None or momentum == 0 else momentum * bufs[i] + d
            ws[i] = w - lr * bufs[i]
    return ws


def _np_lamb(ws, grads, lr, b1, b2, eps, wd, bias_correction=True, adapt=None):
    """LAMB in numpy (You et al. 2019, Alg. 2, phi = identity)."""
    ws = [w.copy() for w in ws]
    adapt = adapt or [True] * len(ws)
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g ** 2
            m_hat, v_hat = ms[i], vs[i]
            if bias_correction:
                m_hat, v_hat = m_hat / (1 - b1 ** t), v_hat / (1 - b2 ** t)
            u = m_hat / (np.sqrt(v_hat) + eps) + wd * ws[i]
            ratio = 1.0
            if adapt[i]:
                wn, un = np.linalg.norm(ws[i]), np.linalg.norm(u)
                ratio = wn / un if wn > 0 and un > 0 else 1.0
            ws[i] = ws[i] - lr * ratio * u
    return ws


def _assert_close(actual, expected):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


# ---- LARS -------------------------------------------------------------------------------

def test_lars_one_step_worked_by_hand():
    # |w| = 5, |g| = 1, eta = 0.1, no decay: ratio = 0.1 * 5 / 1 = 0.5, step = lr * 0.5 * g.
    (w,) = params = _params(np.array([3.0, 4.0]))
    opt = LARS(params, lr=2.0, momentum=0.9, trust_coefficient=0.1, eps=0.0)
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(w.detach().numpy(), [3.0 - 2 * 0.5 * 0.6, 4.0 - 2 * 0.5 * 0.8])


def test_lars_one_step_on_two_tensor_model():
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8)
    params = _params(W0, B0)
    got = _run(LARS(params, **kw), params, GRADS[:1])
    want = _np_lars([W0, B0], GRADS[:1], kw["lr"], kw["momentum"], kw["weight_decay"],
                    kw["trust_coefficient"], kw["eps"])
    _assert_close(got, want)
    # Hand check of the weight tensor: d = g + wd w, ratio = eta |w| / (|g| + wd |w| + eps).
    g = GRADS[0][0]
    ratio = 0.02 * np.linalg.norm(W0) / (np.linalg.norm(g) + 1e-2 * np.linalg.norm(W0) + 1e-8)
    np.testing.assert_allclose(got[0], W0 - 0.5 * ratio * (g + 1e-2 * W0), rtol=1e-12)


def test_lars_two_steps_with_momentum_and_weight_decay():
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8)
    params = _params(W0, B0)
    got = _run(LARS(params, **kw), params, GRADS[:2])
    want = _np_lars([W0, B0], GRADS[:2], kw["lr"], kw["momentum"], kw["weight_decay"],
                    kw["trust_coefficient"], kw["eps"])
    _assert_close(got, want)
    # Momentum matters: without it the second step differs.
    no_momentum = _np_lars([W0, B0], GRADS[:2], 0.5, 0.0, 1e-2, 0.02, 1e-8)
    assert not np.allclose(got[0], no_momentum[0])


def test_lars_without_momentum_keeps_no_buffer():
    params = _params(W0, B0)
    opt = LARS(params, lr=0.3, momentum=0.0, weight_decay=1e-3)
    got = _run(opt, params, GRADS[:2])
    _assert_close(got, _np_lars([W0, B0], GRADS[:2], 0.3, 0.0, 1e-3, 0.001, 1e-8))
    assert all("momentum_buffer" not in opt.state[p] for p in params)


@pytest.mark.parametrize("w, g", [
    (np.array([1.0, -2.0]), np.array([0.0, 0.0])),     # zero gradient
    (np.array([0.0, 0.0]), np.array([0.5, -1.5])),     # zero weight (e.g. a fresh bias)
])
def test_lars_trust_ratio_is_one_when_a_norm_is_zero(w, g):
    (p,) = params = _params(w)
    opt = LARS(params, lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001)
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), w - 0.1 * g)   # plain SGD step
    assert np.all(np.isfinite(p.detach().numpy()))


def test_lars_zero_gradient_with_weight_decay_uses_ratio_one():
    # |g| = 0 but wd |w| > 0: the ratio is still 1 by definition, the step is lr * wd * w.
    (p,) = params = _params(np.array([1.0, -2.0]))
    opt = LARS(params, lr=0.1, momentum=0.0, weight_decay=0.1, trust_coefficient=0.001)
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    np.testing.assert_allclose(p.detach().numpy(), [1.0 - 0.01, -2.0 + 0.02])


def test_lars_1d_exclusion_gives_bias_the_plain_update():
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8)
    params = _params(W0, B0)
    got = _run(LARS(params, exclude_from_adaptation="1d", **kw), params, GRADS[:2])
    want = _np_lars([W0, B0], GRADS[:2], 0.5, 0.9, 1e-2, 0.02, 1e-8, adapt=[True, False])
    _assert_close(got, want)
    plain_sgd = _np_lars([B0], [[g[1]] for g in GRADS[:2]], 0.5, 0.9, 1e-2, 0.02, 1e-8,
                         adapt=[False])
    _assert_close(got[1:], plain_sgd)
    # The plain update is torch.optim.SGD's, step for step.
    (ref,) = ref_params = _params(B0)
    sgd = torch.optim.SGD(ref_params, lr=0.5, momentum=0.9, weight_decay=1e-2)
    _assert_close(got[1:], _run(sgd, ref_params, [[g[1]] for g in GRADS[:2]]))


def test_lars_group_flag_and_callable_exclusion():
    w_param, b_param = params = _params(W0, B0)
    opt = LARS([{"params": [w_param]}, {"params": [b_param], "trust_adaptation": False}],
               lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    got = _run(opt, params, GRADS[:2])
    want = _np_lars([W0, B0], GRADS[:2], 0.5, 0.9, 1e-2, 0.02, 1e-8, adapt=[True, False])
    _assert_close(got, want)

    params = _params(W0, B0)
    opt = LARS(params, lr=0.5, weight_decay=1e-2, trust_coefficient=0.02,
               exclude_from_adaptation=lambda p: p.shape == (2, 3))
    got = _run(opt, params, GRADS[:2])
    want = _np_lars([W0, B0], GRADS[:2], 0.5, 0.9, 1e-2, 0.02, 1e-8, adapt=[False, True])
    _assert_close(got, want)


# ---- LAMB -------------------------------------------------------------------------------

def test_lamb_one_step_worked_by_hand():
    # Step 1 with bias correction: m_hat = g, v_hat = g^2, so u = sign(g) + wd w (eps = 0).
    # w = (3, 4), g = (1, -2), wd = 0.5: u = (1 + 1.5, -1 + 2) = (2.5, 1), |w| = 5.
    (w,) = params = _params(np.array([3.0, 4.0]))
    opt = LAMB(params, lr=0.1, eps=0.0, weight_decay=0.5)
    w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    opt.step()
    ratio = 5.0 / np.sqrt(2.5 ** 2 + 1.0 ** 2)
    np.testing.assert_allclose(w.detach().numpy(),
                               [3.0 - 0.1 * ratio * 2.5, 4.0 - 0.1 * ratio * 1.0], rtol=1e-12)


def test_lamb_one_step_on_two_tensor_model():
    params = _params(W0, B0)
    got = _run(LAMB(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01),
               params, GRADS[:1])
    _assert_close(got, _np_lamb([W0, B0], GRADS[:1], 1e-2, 0.9, 0.99, 1e-6, 0.01))


def test_lamb_two_steps_with_bias_correction_and_weight_decay():
    params = _params(W0, B0)
    got = _run(LAMB(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01),
               params, GRADS[:2])
    _assert_close(got, _np_lamb([W0, B0], GRADS[:2], 1e-2, 0.9, 0.99, 1e-6, 0.01))
    # Bias correction matters at step 2.
    uncorrected = _np_lamb([W0, B0], GRADS[:2], 1e-2, 0.9, 0.99, 1e-6, 0.01,
                           bias_correction=False)
    assert not np.allclose(got[0], uncorrected[0])


def test_lamb_without_bias_correction():
    params = _params(W0, B0)
    got = _run(LAMB(params, lr=1e-2, weight_decay=0.01, bias_correction=False),
               params, GRADS[:3])
    _assert_close(got, _np_lamb([W0, B0], GRADS[:3], 1e-2, 0.9, 0.999, 1e-6, 0.01,
                                bias_correction=False))


def test_lamb_state_uses_adam_names():
    params = _params(W0, B0)
    opt = LAMB(params, lr=1e-2)
    _run(opt, params, GRADS[:2])
    adam_params = _params(W0, B0)
    adam = torch.optim.Adam(adam_params, lr=1e-2)
    _run(adam, adam_params, GRADS[:2])
    for p, q in zip(params, adam_params):
        st, ref = opt.state[p], adam.state[q]
        assert set(st) == set(ref) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.is_tensor(st["step"]) and float(st["step"]) == 2.0
        torch.testing.assert_close(st["exp_avg"], ref["exp_avg"])
        torch.testing.assert_close(st["exp_avg_sq"], ref["exp_avg_sq"])


@pytest.mark.parametrize("w, g", [
    (np.array([0.0, 0.0]), np.array([0.5, -1.5])),     # zero weight: ratio 1
    (np.array([1.0, -2.0]), np.array([0.0, 0.0])),     # zero gradient, no decay: u = 0
])
def test_lamb_trust_ratio_is_one_when_a_norm_is_zero(w, g):
    (p,) = params = _params(w)
    opt = LAMB(params, lr=0.1, eps=1e-6, weight_decay=0.0)
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    u = g / (np.abs(g) + 1e-6)                         # step 1: m_hat = g, v_hat = g^2
    np.testing.assert_allclose(p.detach().numpy(), w - 0.1 * u, rtol=1e-12)
    assert np.all(np.isfinite(p.detach().numpy()))


def test_lamb_group_without_trust_adaptation_is_plain_adam_update():
    w_param, b_param = params = _params(W0, B0)
    opt = LAMB([{"params": [w_param]},
                {"params": [b_param], "trust_adaptation": False, "weight_decay": 0.0}],
               lr=1e-2, weight_decay=0.01)
    got = _run(opt, params, GRADS[:2])
    _assert_close(got[:1], _np_lamb([W0], [[g[0]] for g in GRADS[:2]], 1e-2, 0.9, 0.999,
                                    1e-6, 0.01))
    plain = _np_lamb([B0], [[g[1]] for g in GRADS[:2]], 1e-2, 0.9, 0.999, 1e-6, 0.0,
                     adapt=[False])
    _assert_close(got[1:], plain)
    # ... which is torch.optim.Adam's step.
    (ref,) = ref_params = _params(B0)
    adam = torch.optim.Adam(ref_params, lr=1e-2, eps=1e-6)
    _assert_close(got[1:], _run(adam, ref_params, [[g[1]] for g in GRADS[:2]]))


# ---- arguments --------------------------------------------------------------------------

def _one_param():
    return [torch.zeros(2, requires_grad=True)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), r"lr must be >= 0, got -0.1; pass the global learning rate"),
    (dict(lr="fast"), r"lr must be a real number, got 'fast'"),
    (dict(lr=0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0; pass e.g."),
    (dict(lr=0.1, momentum=-0.5), r"momentum must be in \[0, 1\)"),
    (dict(lr=0.1, weight_decay=-1e-4), r"weight_decay must be >= 0"),
    (dict(lr=0.1, trust_coefficient=0.0), r"trust_coefficient must be > 0.*trust_adaptation"),
    (dict(lr=0.1, eps=-1.0), r"eps must be >= 0"),
    (dict(lr=0.1, exclude_from_adaptation="bias"),
     r"exclude_from_adaptation must be None, '1d' or a callable"),
    (dict(lr=0.1, exclude_from_adaptation=3),
     r"exclude_from_adaptation must be None, '1d' or a callable"),
])
def test_lars_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LARS(_one_param(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), r"lr must be >= 0, got -0.001; pass the global learning rate"),
    (dict(lr=1e-3, betas=(0.9,)), r"betas must be a pair \(beta1, beta2\)"),
    (dict(lr=1e-3, betas=0.9), r"betas must be a pair"),
    (dict(lr=1e-3, betas=(1.0, 0.999)), r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(lr=1e-3, betas=(0.9, -0.1)), r"betas\[1\] must be in \[0, 1\)"),
    (dict(lr=1e-3, eps=-1e-6), r"eps must be >= 0"),
    (dict(lr=1e-3, weight_decay=-0.01), r"weight_decay must be >= 0"),
    (dict(lr=1e-3, bias_correction="yes"), r"bias_correction must be True or False"),
])
def test_lamb_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LAMB(_one_param(), **kwargs)


def test_bad_param_group_is_rejected_and_not_kept():
    opt = LARS(_one_param(), lr=0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        opt.add_param_group({"params": _one_param(), "momentum": 2.0})
    with pytest.raises(ValueError, match=r"trust_adaptation must be True or False"):
        opt.add_param_group({"params": _one_param(), "trust_adaptation": "no"})
    assert len(opt.param_groups) == 1
    lamb = LAMB(_one_param(), lr=1e-3)
    with pytest.raises(ValueError, match=r"lr must be >= 0"):
        lamb.add_param_group({"params": _one_param(), "lr": -1.0})
    assert len(lamb.param_groups) == 1


# ---- checkpoint, schedulers, packaging --------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02,
                    exclude_from_adaptation="1d"),
    lambda ps: LAMB(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01),
], ids=["LARS", "LAMB"])
def test_state_dict_round_trip_continues_identically(make):
    params = _params(W0, B0)
    opt = make(params)
    _run(opt, params, GRADS[:2])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed = [torch.tensor(t.numpy(), dtype=torch.float64, requires_grad=True)
               for t in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    got_original = _run(opt, params, GRADS[2:])
    got_resumed = _run(opt2, resumed, GRADS[2:])
    for a, b in zip(got_original, got_resumed):
        np.testing.assert_array_equal(a, b)


def test_lars_honours_scheduler_lr_change():
    params = _params(W0, B0)
    opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    got = _run(opt, params, GRADS[:1])
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    got = _run(opt, params, GRADS[1:2])
    # numpy: step 1 at lr 0.5, step 2 at lr 0.05, same momentum buffer.
    ws, bufs = [W0.copy(), B0.copy()], [None, None]
    for lr, step_grads in ((0.5, GRADS[0]), (0.05, GRADS[1])):
        for i, g in enumerate(step_grads):
            d = g + 1e-2 * ws[i]
            wn, gn = np.linalg.norm(ws[i]), np.linalg.norm(g)
            d = 0.02 * wn / (gn + 1e-2 * wn + 1e-8) * d
            bufs[i] = d if bufs[i] is None else 0.9 * bufs[i] + d
            ws[i] = ws[i] - lr * bufs[i]
    _assert_close(got, ws)


def test_lamb_honours_per_step_lr_factor_like_adaptive_data_parallel():
    # AdaptiveDataParallel multiplies param_group["lr"] for one step and then restores it.
    params = _params(W0, B0)
    opt = LAMB(params, lr=1e-2, weight_decay=0.01)
    _run(opt, params, GRADS[:1])
    user_lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = user_lr * 4.0
    got = _run(opt, params, GRADS[1:2])
    opt.param_groups[0]["lr"] = user_lr

    w1 = _np_lamb([W0, B0], GRADS[:1], 1e-2, 0.9, 0.999, 1e-6, 0.01)
    # Second step by hand from the state after step 1, at lr 4e-2.
    want = []
    for i in range(2):
        g1, g2 = GRADS[0][i], GRADS[1][i]
        m = 0.9 * (0.1 * g1) + 0.1 * g2
        v = 0.999 * (0.001 * g1 ** 2) + 0.001 * g2 ** 2
        u = (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-6) + 0.01 * w1[i]
        want.append(w1[i] - 4e-2 * np.linalg.norm(w1[i]) / np.linalg.norm(u) * u)
    _assert_close(got, want)


def test_works_on_float32_module_with_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for opt in (LARS(model.parameters(), lr=1.0, exclude_from_adaptation="1d"),
                LAMB(model.parameters(), lr=1e-2, weight_decay=0.01)):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        first = float(opt.step(closure).detach())
        for _ in range(20):
            last = float(opt.step(closure).detach())
        assert last < first
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_package_attribute_import(monkeypatch):
    # adaptrun/__init__.py imports unknown attributes as submodules; check it from scratch.
    import adaptrun
    monkeypatch.delitem(sys.modules, "adaptrun.worker.optim")
    monkeypatch.delattr(adaptrun, "optim")
    module = adaptrun.worker.optim
    assert module is sys.modules["adaptrun.worker.optim"]
    assert issubclass(module.LARS, torch.optim.Optimizer)
    assert issubclass(module.LAMB, torch.optim.Optimizer)
