"""KRNet (one distillation point): shapes, kernel constraints, resizing, gradients, errors."""
import pytest
import torch
from torch import nn

from krdistill.archs.krnet_arch import KRNet

B, CS, CT, H, W = 2, 6, 10, 8, 9


def feats(cs=CS, ct=CT, h=H, w=W, ht=None, wt=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(B, cs, h, w, generator=g, dtype=dtype, requires_grad=True)
    ft = torch.randn(B, ct, ht or h, wt or w, generator=g, dtype=dtype)
    return fs, ft


def small(**kw):
    kw.setdefault('num_kernels', 4)
    kw.setdefault('hidden', 8)
    kw.setdefault('fitnet_branch', False)  # the texture representation alone
    return KRNet(s_channels=kw.pop('s_channels', CS), t_channels=kw.pop('t_channels', CT), **kw)


@pytest.mark.parametrize('kw, kshape', [
    ({}, (B, 4, 3, 3)),
    ({'per_pixel': True}, (B, 4, 9, H, W)),
    ({'dynamic': False}, (B, 4, 3, 3)),
    ({'kernel_size': 5, 'corr_radius': 2}, (B, 4, 5, 5)),
    ({'use_correlation': False, 'width': 3}, (B, 4, 3, 3)),
])
def test_shapes(kw, kshape):
    kr = small(**kw)
    out = kr(*feats())
    c = kw.get('width', min(64, CS))
    assert set(out) == {'tex_s', 'tex_t', 'weights', 'kernels'}
    assert out['tex_s'].shape == (B, 4, c, H, W)
    assert out['tex_t'].shape == (B, 4, c, H, W)
    assert out['weights'].shape == (B, 4)
    assert out['kernels'].shape == kshape


def test_default_width_and_repr():
    assert KRNet(s_channels=128, t_channels=256).width == 64
    assert KRNet(s_channels=16, t_channels=256).width == 16
    r = repr(small(per_pixel=True))
    assert 'per_pixel=True' in r and "normalize='rms'" in r and 'width=6' in r


@pytest.mark.parametrize('kw', [{}, {'per_pixel': True}, {'dynamic': False}])
def test_kernels_zero_mean_unit_norm_weights_simplex(kw):
    out = small(**kw)(*feats())
    k = out['kernels']
    taps = k.flatten(2) if k.dim() == 4 else k  # B x N x kk (x H x W)
    torch.testing.assert_close(taps.mean(dim=2), torch.zeros_like(taps.mean(dim=2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(taps.norm(dim=2), torch.ones_like(taps.norm(dim=2)), atol=1e-4, rtol=0)
    w = out['weights']
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(B))


def test_initial_bank_orthonormal_and_weights_near_uniform():
    torch.manual_seed(0)
    kr = KRNet(s_channels=CS, t_channels=CT, fitnet_branch=False)  # N = 8, k = 3: a basis of 3x3 high-pass kernels
    bank = kr.kernel_head.bias.detach().view(8, 9)
    torch.testing.assert_close(bank @ bank.t(), torch.eye(8), atol=1e-5, rtol=0)
    out = kr(*feats())
    assert (out['weights'] - 1 / 8).abs().max() < 0.02


def test_texture_matches_manual_conv():
    """T^n = w_n * P with replicate padding, per sample; same kernel on both sides."""
    kr = small(normalize='none').double()
    fs, ft = feats(dtype=torch.float64)
    out = kr(fs, ft)
    p_s = kr.adapter_s(fs)
    for b in range(B):
        for n in range(4):
            k = out['kernels'][b, n]
            ref = nn.functional.conv2d(nn.functional.pad(p_s[b:b + 1], (1, 1, 1, 1), mode='replicate'),
                                       k.expand(CS, 1, 3, 3), groups=CS)[0]
            torch.testing.assert_close(out['tex_s'][b, n], ref)


def test_per_pixel_matches_per_sample_when_kernels_constant():
    """The per-pixel path (unfold + einsum) computes the same texture as the grouped conv."""
    kr = small(per_pixel=True).double()
    with torch.no_grad():
        kr.kernel_head.weight.zero_()  # kernels = normalised bias everywhere
    fs, ft = feats(dtype=torch.float64)
    out = kr(fs, ft)
    static = small(dynamic=False).double()
    static.load_state_dict({'adapter_s.weight': kr.adapter_s.weight, 'adapter_t.weight': kr.adapter_t.weight,
                            'kernel_bank': kr.kernel_head.bias.view(4, 9), 'weight_logits': torch.zeros(4)})
    ref = static(fs, ft)
    torch.testing.assert_close(out['tex_s'], ref['tex_s'])
    torch.testing.assert_close(out['tex_t'], ref['tex_t'])


def test_constant_map_has_zero_texture():
    kr = small(normalize='none')
    fs = torch.ones(B, CS, H, W)
    out = kr(fs, torch.ones(B, CT, H, W))
    assert out['tex_s'].abs().max() < 1e-5 and out['tex_t'].abs().max() < 1e-5


def test_rms_normalisation_is_scale_invariant():
    kr = small(eps=1e-20).double()  # eps is the only thing breaking exact invariance
    fs, ft = feats(dtype=torch.float64)
    a, b = kr(fs, ft), kr(fs * 7.0, ft * 0.01)
    torch.testing.assert_close(a['tex_s'], b['tex_s'])
    torch.testing.assert_close(a['tex_t'], b['tex_t'])


def test_teacher_resized():
    kr = small()
    fs, ft = feats(ht=4, wt=5)
    out = kr(fs, ft)
    assert out['tex_t'].shape == (B, 4, CS, H, W)
    # Equal to resizing the teacher feature beforehand (the 1x1 adapter has no bias).
    ft_up = nn.functional.interpolate(ft, size=(H, W), mode='bilinear', align_corners=False)
    torch.testing.assert_close(out['tex_t'], kr(fs, ft_up)['tex_t'], atol=1e-5, rtol=1e-4)


def test_different_channel_counts():
    kr = small(s_channels=3, t_channels=70)
    out = kr(*feats(cs=3, ct=70))
    assert out['tex_s'].shape == (B, 4, 3, H, W)


@pytest.mark.parametrize('kw', [{}, {'per_pixel': True}, {'dynamic': False}, {'use_correlation': False}])
def test_gradients_reach_all_parameters_and_student_feature(kw):
    kr = small(**kw)
    fs, ft = feats()
    out = kr(fs, ft)
    loss = (out['weights'][:, :, None, None, None] * (out['tex_s'] - out['tex_t']).abs()).mean()
    loss.backward()
    for name, p in kr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert not ft.requires_grad


def test_correlation_changes_generator_input():
    with_c, without = small(corr_radius=2), small(use_correlation=False)
    assert with_c.gen_in_channels == CS + 25 and with_c.generator[0].in_channels == CS + 25
    assert without.gen_in_channels == CS and without.generator[0].in_channels == CS


def test_correlation_volume():
    kr = small(corr_radius=1).double()
    p = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    corr = kr.correlation(p, p)
    assert corr.shape == (1, 9, 5, 6)
    ones = torch.ones(1, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(corr[:, 4], ones, atol=1e-4, rtol=0)  # d = 0: cosine with itself (up to eps)
    pn = p / p.norm(dim=1, keepdim=True)
    # d = (dy, dx) = (1, -1) is map (1+1)*3 + (-1+1) = 6
    torch.testing.assert_close(corr[0, 6, 1, 2], (pn[0, :, 1, 2] * pn[0, :, 2, 1]).sum(), atol=1e-4, rtol=0)
    assert corr[0, 6, 4, 0] == 0  # outside the map


def test_bad_inputs():
    kr = small()
    fs, ft = feats()
    with pytest.raises(ValueError, match='4-D'):
        kr(fs[0], ft)
    with pytest.raises(ValueError, match='batch sizes differ'):
        kr(fs, ft[:1])
    with pytest.raises(ValueError, match='s_channels=6'):
        kr(fs[:, :5], ft)
    with pytest.raises(ValueError, match='t_channels=10'):
        kr(fs, ft[:, :3])
    with pytest.raises(TypeError, match='tensors'):
        kr(fs, None)


@pytest.mark.parametrize('kw, msg', [
    ({'kernel_size': 4}, 'odd'),
    ({'kernel_size': 1}, 'odd'),
    ({'normalize': 'batch'}, 'normalize'),
    ({'per_pixel': True, 'dynamic': False}, 'per_pixel'),
    ({'corr_radius': -1}, 'corr_radius'),
    ({'width': 0}, 'width'),
])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        small(**kw)


def test_normalize_bool_aliases():
    assert small(normalize=True).normalize == 'rms'
    assert small(normalize=False).normalize == 'none'


def test_torch_only():
    import krdistill.archs.krnet_arch as m
    src = open(m.__file__).read()
    assert 'basicsr' not in src.replace('BasicSR', '')


def test_unfold_texture_equals_grouped_conv_to_second_order():
    """The per-sample texture op equals the grouped-convolution definition, also in its gradients
    of gradients (what the exact meta step differentiates)."""
    import torch.nn.functional as F
    from krdistill.archs.krnet_arch import _unfold_texture
    g = torch.Generator().manual_seed(0)
    b, c, n, k, h, w = 2, 3, 4, 3, 5, 6
    x = torch.randn(b, c, h + k - 1, w + k - 1, generator=g, dtype=torch.float64, requires_grad=True)
    ker = torch.randn(b, n, k * k, generator=g, dtype=torch.float64, requires_grad=True)

    def grouped(x, ker):
        weight = ker.view(b, n, k, k).unsqueeze(1).expand(b, c, n, k, k).reshape(b * c * n, 1, k, k)
        out = F.conv2d(x.reshape(1, b * c, h + k - 1, w + k - 1), weight, groups=b * c)
        return out.view(b, c, n, h, w).transpose(1, 2)

    ref, got = grouped(x, ker), _unfold_texture(x, ker, k, h, w)
    torch.testing.assert_close(got, ref)
    v = torch.randn_like(ref)
    gx_r, gk_r = torch.autograd.grad((ref * v).sum(), (x, ker), create_graph=True)
    gx_g, gk_g = torch.autograd.grad((got * v).sum(), (x, ker), create_graph=True)
    torch.testing.assert_close(gx_g, gx_r)
    torch.testing.assert_close(gk_g, gk_r)
    hh_r = torch.autograd.grad((gx_r ** 2).sum() + (gk_r ** 2).sum(), (x, ker))
    hh_g = torch.autograd.grad((gx_g ** 2).sum() + (gk_g ** 2).sum(), (x, ker))
    for a, r in zip(hh_g, hh_r):
        torch.testing.assert_close(a, r)


def test_removed_gain_names_what_replaced_it():
    """``network_kr.gain`` (the first version's learned texture strength) is gone: the FitNet
    branch's ``b_tex`` replaced it. The error says so instead of building something else."""
    from krdistill.build import build_metakd
    from test_api import Tiny
    with pytest.raises(KeyError, match=r'network_kr\.gain: removed; fitnet_branch: true'):
        build_metakd(Tiny(8, 2), Tiny(4, 1), ['body.1'], ['body.0'], network_kr=dict(type='KRNet', gain=True))
