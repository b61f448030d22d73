"""The meta update (krdistill.meta) on a tiny student and a tiny KRNet, float64."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from helpers import cpu_data_parallel
from krdistill.archs.krnet_arch import KRNet
from krdistill.features import FeatureRecorder, unwrap
from krdistill.losses.texture_loss import texture_wise_loss
from krdistill.meta import meta_gradient, optimizer_state, optimizer_step, student_params, virtual_step

LR = 0.1
DT = torch.float64


class TinyStudent(nn.Module):
    """2-layer residual conv net with a frozen parameter and a buffer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.Tanh()  # smooth, so finite differences see no kinks
        self.conv2 = nn.Conv2d(3, 1, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.5), requires_grad=False)
        self.register_buffer('offset', torch.tensor(0.1))

    def forward(self, x):
        return x + self.gain * self.conv2(self.act(self.conv1(x))) + self.offset


class Setup:
    """Student, KRNet, data and the two closures of the meta step."""

    def __init__(self, seed=0, per_pixel=False):
        torch.manual_seed(seed)
        self.student = TinyStudent().to(DT)
        self.krnet = KRNet(s_channels=3, t_channels=4, num_kernels=2, hidden=4, per_pixel=per_pixel, fitnet_branch=False).to(DT)
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.rand(2, 1, 6, 6, generator=g, dtype=DT)
        self.y = torch.rand(2, 1, 6, 6, generator=g, dtype=DT)
        self.feat_t = torch.randn(2, 4, 6, 6, generator=g, dtype=DT)  # teacher feature, detached
        self.x_m = torch.rand(2, 1, 6, 6, generator=g, dtype=DT)
        self.y_m = torch.rand(2, 1, 6, 6, generator=g, dtype=DT)
        self.recorder = FeatureRecorder(self.student, ['conv1'])

    def student_loss(self, params, net=None):
        bare = unwrap(net if net is not None else self.student)
        with self.recorder:
            out = functional_call(bare, params, (self.x,))
        kr = self.krnet(self.recorder.features()[0], self.feat_t)
        # Charbonnier with a wide eps: the hypergradient involves the third derivative of rho,
        # ~1/eps^2, so a small eps (or L1) would need tiny, noise-dominated difference steps.
        return F.mse_loss(out, self.y) + texture_wise_loss(kr['tex_s'], kr['tex_t'], kr['weights'],
                                                           criterion='charbonnier', eps=0.3)

    def meta_loss(self, params, net=None):
        bare = unwrap(net if net is not None else self.student)
        return F.mse_loss(functional_call(bare, params, (self.x_m,)), self.y_m)

    def phi(self):
        return list(self.krnet.parameters())

    def meta(self, **kw):
        kw.setdefault('lr', LR)
        return meta_gradient(self.student, self.student_loss, self.meta_loss, self.phi(), **kw)

    def l_meta_after_step(self):
        """L_meta(theta'(phi)) computed from scratch (first order only): the numerical reference."""
        params = {n: p.detach().requires_grad_(p.requires_grad) for n, p in student_params(self.student).items()}
        names = [n for n, p in params.items() if p.requires_grad]
        g = torch.autograd.grad(self.student_loss(params), [params[n] for n in names])
        with torch.no_grad():
            return self.meta_loss(virtual_step(params, dict(zip(names, g)), LR))


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize('per_pixel', [False, True])
def test_exact_equals_numerical_directional(per_pixel):
    """d/dt L_meta(theta'(phi + t u)) at t=0 equals <grad, u> for random directions u."""
    s = Setup(per_pixel=per_pixel)
    grads, info = s.meta(mode='exact')
    assert info['l_meta'] > 0 and info['grad_norm'] > 0
    g = torch.Generator().manual_seed(3)
    h = 1e-5
    for _ in range(3):
        u = [torch.randn(p.shape, generator=g, dtype=DT) for p in s.phi()]
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(s.phi(), u):
                    p.add_(sign * h * d)
            vals.append(s.l_meta_after_step())
            with torch.no_grad():
                for p, d in zip(s.phi(), u):
                    p.sub_(sign * h * d)
        numerical = (vals[0] - vals[1]) / (2 * h)
        analytic = (flat(grads) * flat(u)).sum()
        torch.testing.assert_close(analytic, numerical, rtol=1e-5, atol=1e-12)


def test_exact_equals_numerical_per_entry():
    """Central differences on 30 random entries of phi (every parameter tensor covered)."""
    s = Setup()
    grads, _ = s.meta(mode='exact')
    g = torch.Generator().manual_seed(4)
    h = 1e-5
    picks = [(i, int(torch.randint(p.numel(), (1,), generator=g))) for i, p in enumerate(s.phi())]
    picks += [(int(torch.randint(len(s.phi()), (1,), generator=g)), None) for _ in range(30 - len(picks))]
    for i, j in picks:
        p = s.phi()[i]
        j = int(torch.randint(p.numel(), (1,), generator=g)) if j is None else j
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                p.view(-1)[j] += sign * h
            vals.append(s.l_meta_after_step())
            with torch.no_grad():
                p.view(-1)[j] -= sign * h
        numerical = (vals[0] - vals[1]) / (2 * h)
        torch.testing.assert_close(grads[i].view(-1)[j], numerical, rtol=1e-5, atol=1e-11)


def _adam_state(s):
    opt = torch.optim.Adam(s.student.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        s.student_loss(student_params(s.student)).backward()
        opt.step()
    s.krnet.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize('adam_step', [False, True])
def test_finite_difference_agrees_with_exact(adam_step):
    """DARTS' estimate is a central difference: its error is O(fd_eps^2). Tolerance (relative L2
    error of the whole gradient vector): < 1e-4 at fd_eps = 1e-3 and < 1e-3 at the default
    fd_eps = 0.01 (the error falls 100x per 10x smaller fd_eps, as it should), for the plain
    virtual step and through the step of an Adam with state (``step_fn``)."""
    s = Setup()
    kw = dict(step_fn=optimizer_step(_adam_state(s), s.student.named_parameters())) if adam_step else {}
    exact, _ = s.meta(mode='exact', **kw)
    for fd_eps, tol in ((1e-3, 1e-4), (1e-2, 1e-3)):
        fd, info = s.meta(mode='finite_difference', fd_eps=fd_eps, **kw)
        rel = (flat(fd) - flat(exact)).norm() / flat(exact).norm()
        assert rel < tol, (fd_eps, rel.item())
        assert info['fd_step'] > 0


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_student_untouched(mode):
    s = Setup()
    s.student.conv1.weight.grad = None
    before = {k: v.clone() for k, v in s.student.state_dict().items()}
    before_ids = {n: id(p) for n, p in s.student.named_parameters()}
    s.meta(mode=mode)
    after = s.student.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # bit-identical, buffers included
    assert {n: id(p) for n, p in s.student.named_parameters()} == before_ids
    assert all(p.grad is None for p in s.student.parameters())
    assert all(p.grad is None for p in s.krnet.parameters())  # grads are returned, not accumulated


def test_frozen_student_params_passed_through():
    s = Setup()
    seen = {}

    def meta_loss(params):
        seen.update(params)
        return s.meta_loss(params)

    meta_gradient(s.student, s.student_loss, meta_loss, s.phi(), lr=LR)
    assert seen['gain'] is s.student.gain  # not stepped: the very same tensor
    assert not torch.equal(seen['conv1.weight'], s.student.conv1.weight)  # stepped


def test_batchnorm_buffers_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 3, padding=1)).to(DT)
    kr = KRNet(s_channels=2, t_channels=2, num_kernels=2, hidden=4, fitnet_branch=False).to(DT)
    rec = FeatureRecorder(net, ['1'])
    x, y = torch.rand(2, 1, 5, 5, dtype=DT), torch.rand(2, 1, 5, 5, dtype=DT)

    def l_s(params):
        with rec:
            out = functional_call(net, params, (x,))
        f = rec.features()[0]
        k = kr(f, f.detach().flip(-1))
        return F.mse_loss(out, y) + texture_wise_loss(k['tex_s'], k['tex_t'], k['weights'])

    def l_m(params):
        return F.mse_loss(functional_call(net, params, (x.flip(-2),)), y)

    before = {k: v.clone() for k, v in net.state_dict().items()}
    for mode in ('exact', 'finite_difference'):
        meta_gradient(net, l_s, l_m, list(kr.parameters()), lr=LR, mode=mode)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_optimizer_state_reads_adam_and_sgd():
    """The one reading of optimizer state (optimizer_step and HorizonTrace use it)."""
    s = Setup()
    opt = torch.optim.AdamW(s.student.parameters(), lr=1e-3, amsgrad=True, weight_decay=0.01)
    s.student_loss(student_params(s.student)).backward()
    opt.step()
    p = s.student.conv2.bias
    st = optimizer_state(opt, opt.param_groups[0], opt.state[p])
    assert st['kind'] == 'adam' and st['step'] == 1.0 and st['decoupled'] and st['amsgrad'] and st['wd'] == 0.01
    assert torch.equal(st['m'], opt.state[p]['exp_avg']) and torch.equal(st['vmax'], opt.state[p]['max_exp_avg_sq'])
    assert not st['m'].requires_grad
    assert optimizer_state(opt, opt.param_groups[0], {})['m'] is None  # no state yet
    sgd = torch.optim.SGD(s.student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    st = optimizer_state(sgd, sgd.param_groups[0], {})
    assert st['kind'] == 'sgd' and st['momentum'] == 0.9 and st['nesterov'] and st['buf'] is None


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_data_parallel_wrapper(mode):
    s = Setup()
    ref, _ = s.meta(mode=mode)
    dp = cpu_data_parallel(s.student)
    got, _ = meta_gradient(dp, lambda p: s.student_loss(p, dp), lambda p: s.meta_loss(p, dp), s.phi(), lr=LR,
                           mode=mode)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(student_params(dp)) == set(dict(s.student.named_parameters()))


def test_virtual_step():
    p = {'a': torch.ones(2), 'b': torch.ones(3), 'c': torch.ones(1)}
    g = {'a': torch.full((2,), 2.0), 'b': torch.full((3,), 4.0), 'c': None}
    out = virtual_step(p, g, 0.5)
    torch.testing.assert_close(out['a'], torch.zeros(2))
    torch.testing.assert_close(out['b'], torch.full((3,), -1.0))
    assert out['c'] is p['c']
    assert torch.equal(p['a'], torch.ones(2))  # out of place
    with pytest.raises(ValueError, match='shape'):
        virtual_step(p, {'a': torch.ones(3)}, 0.1)


def test_errors():
    s = Setup()
    with pytest.raises(ValueError, match='mode'):
        s.meta(mode='second_order')
    with pytest.raises(ValueError, match='fd_eps'):
        s.meta(mode='finite_difference', fd_eps=0)
    with pytest.raises(RuntimeError, match='functional_call'):
        meta_gradient(s.student, s.student_loss, lambda p: s.student(s.x_m).mean().detach(), s.phi(), lr=LR)
    with pytest.raises(ValueError, match='scalar'):
        meta_gradient(s.student, s.student_loss, lambda p: functional_call(s.student, p, (s.x_m,)), s.phi(), lr=LR)


def test_lr_zero_gives_zero_gradient():
    s = Setup()
    for mode in ('exact', 'finite_difference'):
        grads, _ = s.meta(mode=mode, lr=0.0)
        assert flat(grads).abs().max() == 0


def test_gradients_have_parameter_layout():
    s = Setup()
    for mode in ('exact', 'finite_difference'):
        grads, _ = s.meta(mode=mode)
        for g, p in zip(grads, s.phi()):
            assert g.shape == p.shape and g.stride() == p.stride() and g.dtype == p.dtype
            assert not g.requires_grad
