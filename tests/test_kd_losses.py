"""kornia-style checklist for the baseline KD losses: shapes, errors, zero on identical inputs,
gradcheck in float64, module == function, and that summing terms keeps the gradient."""
import pytest
import torch

import krdistill  # noqa: F401
from krdistill.losses.kd_loss import (ATLoss, FAKDLoss, FitNetLoss, OutputKDLoss, at_loss, fakd_loss, fitnet_loss,
                                      output_kd_loss, spatial_affinity)


def _pair(c_s=4, c_t=4, size=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, c_s, size, size, generator=g, dtype=dtype),
            torch.randn(2, c_t, size, size, generator=g, dtype=dtype))


FUNCS = {
    'out': lambda s, t: output_kd_loss(s, t),
    'fitnet': lambda s, t: fitnet_loss(s, t),
    'at': lambda s, t: at_loss(s, t),
    'fakd': lambda s, t: fakd_loss(s, t),
}


@pytest.mark.parametrize('name', FUNCS)
def test_identical_inputs_give_zero(name):
    s, _ = _pair()
    assert FUNCS[name](s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('name', FUNCS)
def test_different_inputs_positive_scalar(name):
    s, t = _pair()
    v = FUNCS[name](s, t)
    assert v.dim() == 0 and v.item() > 0


@pytest.mark.parametrize('name', ['out', 'fitnet', 'at', 'fakd'])
def test_gradcheck_float64(name):
    s, t = _pair(c_s=2, c_t=2, size=3, dtype=torch.float64)
    s.requires_grad_(True)
    if name in ('out', 'fitnet', 'fakd'):  # |x| is not differentiable at 0: keep away from ties
        t = t + 0.5
    assert torch.autograd.gradcheck(lambda x: FUNCS[name](x, t), (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('fn', [output_kd_loss, fitnet_loss, at_loss, fakd_loss])
def test_shape_errors_are_clear(fn):
    s = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match='B x C x H x W'):
        fn(s[0], s)
    with pytest.raises(ValueError, match='reduction'):
        fn(s, s, reduction='avg')


def test_output_kd_shape_mismatch_names_upscale():
    with pytest.raises(ValueError, match='upscale'):
        output_kd_loss(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 16, 16))


def test_fitnet_channel_mismatch_without_regressor():
    s, t = _pair(c_s=4, c_t=6)
    with pytest.raises(ValueError, match='channels'):
        fitnet_loss(s, t)


def test_modules_equal_functions_and_weight():
    s, t = _pair(c_s=4, c_t=6)
    m = FitNetLoss(4, 6, loss_weight=0.5)
    assert torch.allclose(m(s, t), 0.5 * fitnet_loss(s, t, m.regressor))
    s2, t2 = _pair(c_s=4, c_t=4)
    assert torch.allclose(OutputKDLoss(2.0)(s2, t2), 2 * output_kd_loss(s2, t2))
    assert torch.allclose(ATLoss(3.0)(s, t), 3 * at_loss(s, t))
    assert torch.allclose(FAKDLoss(1.5, max_size=4)(s, t), 1.5 * fakd_loss(s, t, max_size=4))


def test_reductions():
    s, t = _pair()
    none = at_loss(s, t, reduction='none')
    assert none.shape == (2,)
    assert torch.allclose(at_loss(s, t, reduction='sum'), none.sum())
    assert torch.allclose(at_loss(s, t, reduction='mean'), none.mean())


def test_teacher_of_other_size_is_resized():
    s = torch.randn(1, 4, 6, 6)
    t = torch.randn(1, 4, 12, 12)
    assert fakd_loss(s, t).isfinite() and at_loss(s, t).isfinite()


def test_fakd_pooling_bounds_memory_and_is_exact_when_small():
    big = torch.randn(1, 4, 64, 48)
    assert spatial_affinity(big, max_size=16).shape == (1, 16 * 16, 16 * 16)
    small = torch.randn(1, 4, 8, 8)
    assert torch.allclose(spatial_affinity(small, max_size=32), spatial_affinity(small, max_size=0))


def test_stacked_sum_keeps_gradient():
    """Summing with torch.stack keeps the graph (torch.tensor([...]) would cut it)."""
    s, t = _pair()
    s.requires_grad_(True)
    total = torch.stack([at_loss(s, t), fakd_loss(s, t)]).sum()
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
