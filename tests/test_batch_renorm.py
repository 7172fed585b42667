"""Batch Renormalization (``bn_renorm_epochs``): its forward is the eval-mode forward where the clips do
not bite, its gradient is r times BatchNorm's, the running statistics update exactly as BatchNorm's, the
clips bound the correction, and the modules are plain BatchNorms again afterwards."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from bnas_nni.train.batch_renorm import batch_renorm, batch_renormalization


def _bn(channels: int = 4, affine: bool = True) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    bn.running_mean.normal_(0.0, 0.3)
    bn.running_var.uniform_(0.7, 1.5)
    return bn


@pytest.mark.parametrize('affine', [True, False])
def test_forward_is_the_eval_forward_and_statistics_update_as_batch_norm(affine):
    bn = _bn(affine=affine)
    x = torch.randn(8, 4, 5, 5) * 1.2 + 0.1
    reference = copy.deepcopy(bn)
    expected = copy.deepcopy(bn).eval()(x)
    with batch_renormalization(bn) as bns:
        assert bns == [bn]
        y = bn(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=2e-6)
    reference(x)                                               # plain training-mode BN: the same statistics update
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-6, atol=1e-7)
    assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked) == 1
    assert 'forward' not in bn.__dict__                        # a plain BatchNorm again
    torch.testing.assert_close(bn(x), copy.deepcopy(reference)(x), rtol=0, atol=0)   # batch statistics again


def test_gradient_is_r_times_batch_norms():
    """x̂ = BN_batch(x)·r + d with r, d constants: ∂/∂x equals BatchNorm's with its weight scaled by r."""
    bn = _bn()
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 1.2 + 0.1
    bn = bn.double()
    g = torch.randn_like(x)
    var = x.var(dim=(0, 2, 3), unbiased=False)
    r = (var + bn.eps).sqrt() / (bn.running_var + bn.eps).sqrt()
    assert 1 / 3 < r.min() and r.max() < 3 and not torch.allclose(r, torch.ones_like(r))
    xa = x.clone().requires_grad_()
    batch_renorm(bn, xa).mul(g).sum().backward()
    xb = x.clone().requires_grad_()
    weight = (bn.weight * r).detach().requires_grad_()
    nn.functional.batch_norm(xb, None, None, weight, bn.bias, True, 0.0, bn.eps).mul(g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)


def test_clips_bound_the_correction():
    """Far from the running statistics r and d saturate: the output is BN's with r = r_max, d = ±d_max."""
    bn = _bn(affine=False)
    x = torch.randn(16, 4, 3, 3) * 10.0 + 20.0                # σ_B / σ ≈ 10 > r_max, (μ_B − μ) / σ ≈ 20 > d_max
    y = batch_renorm(bn, x, r_max=3.0, d_max=5.0)
    plain = nn.functional.batch_norm(x, None, None, None, None, True, 0.0, bn.eps)
    torch.testing.assert_close(y, plain * 3.0 + 5.0, rtol=1e-5, atol=1e-5)


def test_eval_mode_is_untouched():
    bn = _bn().eval()
    x = torch.randn(4, 4, 3, 3)
    expected = bn(x)
    before = copy.deepcopy(bn.state_dict())
    with batch_renormalization(bn):
        torch.testing.assert_close(bn(x), expected, rtol=0, atol=0)
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
