"""GhostBatchNorm against plain BatchNorm and against statistics computed by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptrun.worker.ghost_bn import GhostBatchNorm, convert_ghost_batch_norm, ghost_sizes

torch.set_num_threads(1)


def _pair(bn_cls, channels: int, vbs: int, momentum=0.1):
    torch.manual_seed(0)
    bn = bn_cls(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ghost = GhostBatchNorm(channels, vbs, momentum=momentum)
    ghost.load_state_dict(bn.state_dict())
    return bn, ghost


@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (16, 5)),
                                          (nn.BatchNorm1d, (16, 5, 7)),
                                          (nn.BatchNorm2d, (16, 3, 4, 4))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batch_norm_when_virtual_batch_is_the_batch(bn_cls, shape, momentum):
    bn, ghost = _pair(bn_cls, shape[1], vbs=shape[0], momentum=momentum)
    for step in range(3):
        x = (torch.randn(shape) * (step + 1) + step).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = bn(x), ghost(x2)
        torch.testing.assert_close(y2, y)
        upstream = torch.randn(shape)
        (y * upstream).sum().backward()
        (y2 * upstream).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, msg=key)
    torch.testing.assert_close(ghost.weight.grad, bn.weight.grad)
    torch.testing.assert_close(ghost.bias.grad, bn.bias.grad)


def test_each_ghost_batch_is_normalized_with_its_own_statistics():
    torch.manual_seed(1)
    vbs, n, c = 4, 12, 3
    ghost = GhostBatchNorm(c, vbs, momentum=0.5)
    with torch.no_grad():
        ghost.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ghost.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    # ghost batches with very different locations and scales
    x = torch.cat([torch.randn(vbs, c, 2, 2) * s + m for s, m in ((1, 0), (5, 10), (0.1, -3))])
    y = ghost(x)
    expected = []
    for g in x.split(vbs):
        mean = g.mean(dim=(0, 2, 3), keepdim=True)
        var = ((g - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)          # biased
        xhat = (g - mean) / torch.sqrt(var + ghost.eps)
        expected.append(xhat * ghost.weight.view(1, c, 1, 1) + ghost.bias.view(1, c, 1, 1))
    torch.testing.assert_close(y, torch.cat(expected))
    # each ghost batch comes out with mean = bias and std = weight, per channel
    for out in y.split(vbs):
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), ghost.bias.detach(),
                                   atol=1e-5, rtol=0)
    # running stats: one BatchNorm-style update from the pooled ghost statistics
    per = vbs * 4                                  # values per channel in one ghost batch
    means = torch.stack([g.mean(dim=(0, 2, 3)) for g in x.split(vbs)])
    ss = torch.stack([((g - g.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum(dim=(0, 2, 3))
                      for g in x.split(vbs)])
    pooled_var = ss.sum(0) / (3 * (per - 1))
    torch.testing.assert_close(ghost.running_mean, 0.5 * torch.zeros(c) + 0.5 * means.mean(0))
    torch.testing.assert_close(ghost.running_var, 0.5 * torch.ones(c) + 0.5 * pooled_var)
    assert int(ghost.num_batches_tracked) == 1


def test_ragged_batch_is_split_into_near_equal_ghost_batches():
    assert ghost_sizes(12, 4) == [4, 4, 4]
    assert ghost_sizes(10, 4) == [4, 3, 3]
    assert ghost_sizes(3, 4) == [3]
    assert ghost_sizes(3, 2, values_per_example=1) == [3]     # never one value per channel
    assert ghost_sizes(3, 2, values_per_example=16) == [2, 1]
    ghost = GhostBatchNorm(2, 4)
    x = torch.randn(10, 2)
    y = ghost(x)
    for g_in, g_out in zip(x.split([4, 3, 3]), y.split([4, 3, 3])):
        torch.testing.assert_close(g_out, nn.functional.batch_norm(
            g_in, None, None, ghost.weight, ghost.bias, True, 0.0, ghost.eps))


def test_eval_uses_running_statistics():
    ghost = GhostBatchNorm(3, 2)
    for _ in range(5):
        ghost(torch.randn(8, 3) * 2 + 1)
    ghost.eval()
    x = torch.randn(6, 3)
    expected = (x - ghost.running_mean) / torch.sqrt(ghost.running_var + ghost.eps) \
        * ghost.weight + ghost.bias
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    torch.testing.assert_close(ghost(x), expected)
    # eval output of one example does not depend on the rest of the batch
    torch.testing.assert_close(ghost(x[:1]), expected[:1])
    for k, v in ghost.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval"


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_convert_keeps_state_dict_and_shares_parameters():
    torch.manual_seed(2)
    net = _net()
    net(torch.randn(8, 1, 8, 8))                    # move the running stats off their init
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = [id(p) for p in net.parameters()]
    bn2d_weight = net[1].weight
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    out = convert_ghost_batch_norm(net, 4)
    assert out is net
    assert isinstance(net[1], GhostBatchNorm) and isinstance(net[5], GhostBatchNorm)
    assert net[1].virtual_batch_size == 4 and not net[1].training
    assert net[1].weight is bn2d_weight
    assert [id(p) for p in net.parameters()] == params_before
    after = net.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k

    # the optimizer built before the conversion trains the converted layers
    net.train()
    loss = net(torch.randn(8, 1, 8, 8)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(net[1].weight, before["1.weight"])
    # and a state_dict saved from the plain model loads into the converted one
    net.load_state_dict(before)


def test_convert_a_bare_layer_and_again():
    bn = nn.BatchNorm1d(3, momentum=None, eps=1e-3)
    ghost = convert_ghost_batch_norm(bn, 8)
    assert isinstance(ghost, GhostBatchNorm)
    assert ghost.momentum is None and ghost.eps == 1e-3 and ghost.running_mean is bn.running_mean
    assert convert_ghost_batch_norm(ghost, 16) is ghost and ghost.virtual_batch_size == 16
    with pytest.raises(ValueError):
        convert_ghost_batch_norm(nn.BatchNorm1d(3), 0)


def test_without_running_stats_and_without_affine():
    ghost = convert_ghost_batch_norm(nn.BatchNorm1d(3, affine=False, track_running_stats=False),
                                     2)
    assert ghost.running_mean is None and ghost.weight is None
    x = torch.randn(4, 3)
    ghost.eval()                                    # no running stats: batch stats per ghost
    y = ghost(x)
    for g_in, g_out in zip(x.split(2), y.split(2)):
        torch.testing.assert_close(g_out, nn.functional.batch_norm(
            g_in, None, None, None, None, True, 0.0, ghost.eps))


def test_running_statistics_stay_finite_on_half_precision_inputs():
    """Under fp16 autocast the activations reaching BN are fp16: ghost sums of var * n pass
    fp16's 65504 at a few hundred examples. They are taken in fp32: the running statistics
    match those of the same inputs in fp32."""
    torch.manual_seed(0)
    x = torch.randn(2048, 4) * 10 + 3                  # var ~100: var * 1024 > 65504
    ref = GhostBatchNorm(4, 1024)
    ref(x)
    half = GhostBatchNorm(4, 1024)
    half(x.half())
    assert torch.isfinite(half.running_var).all()
    torch.testing.assert_close(half.running_var, ref.running_var, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(half.running_mean, ref.running_mean, rtol=2e-3, atol=1e-3)
