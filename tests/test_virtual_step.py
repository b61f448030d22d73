"""The virtual step of the meta objective is the step the student's optimizer really takes
(krdistill.meta.optimizer_step), and the meta gradient through it matches finite differences."""
import copy

import pytest
import torch

from helpers import central_differences
from krdistill.meta import meta_gradient, optimizer_step, student_params
from test_meta import DT, Setup, flat

OPTIMIZERS = {
    'Adam': lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99)),
    'Adam-wd-amsgrad': lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    'AdamW': lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    'Adam-maximize': lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True),
    'SGD': lambda p: torch.optim.SGD(p, lr=0.1),
    'SGD-momentum': lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    'SGD-nesterov': lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize('warm', [0, 3], ids=['first-step', 'with-state'])
@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_virtual_step_equals_the_optimizer_step(name, warm):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 1)).to(DT)
    opt = OPTIMIZERS[name](net.parameters())
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    for _ in range(warm):  # build moments / momentum buffers
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    net(x).sin().mean().backward()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    virtual = optimizer_step(opt, net.named_parameters())(params, grads)
    state_before = copy.deepcopy(opt.state_dict())
    opt.step()
    for n, p in net.named_parameters():
        assert torch.allclose(virtual[n], p.detach(), rtol=1e-12, atol=1e-14), n
        assert not torch.equal(virtual[n], params[n]), n
    # reading the state changed nothing; the step function is differentiable in the gradient
    assert str(state_before['param_groups']) == str(copy.deepcopy(opt.state_dict())['param_groups'])
    g = {n: t.clone().requires_grad_(True) for n, t in grads.items()}
    out = optimizer_step(opt, net.named_parameters())(params, g)
    assert out['0.weight'].requires_grad


def test_unsupported_optimizer_is_a_clear_error():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match=r'train\.optim_g\.type.*RMSprop.*virtual_step'):
        optimizer_step(torch.optim.RMSprop(net.parameters()), net.named_parameters())


@pytest.mark.parametrize('name', ['Adam', 'AdamW', 'SGD-momentum'])
def test_meta_gradient_through_the_optimizer_step_matches_finite_differences(name):
    """d L_meta(step(theta, g(phi))) / d phi: exact (second order) vs central differences of the
    meta loss in phi, float64; and the DARTS-style estimate along (d theta'/d g)^T v."""
    s = Setup(seed=3)
    opt = OPTIMIZERS[name](s.student.parameters())
    for _ in range(2):  # optimizer state, as in training
        opt.zero_grad()
        s.student_loss(student_params(s.student)).backward(inputs=[p for p in s.student.parameters()
                                                                    if p.requires_grad])
        opt.step()
    step = optimizer_step(opt, s.student.named_parameters())
    exact, _ = meta_gradient(s.student, s.student_loss, s.meta_loss, s.phi(), lr=0.0, step_fn=step)

    def l_meta():
        params = {n: p.detach().requires_grad_(p.requires_grad) for n, p in student_params(s.student).items()}
        names = [n for n, p in params.items() if p.requires_grad]
        g = torch.autograd.grad(s.student_loss(params), [params[n] for n in names])
        with torch.no_grad():
            return s.meta_loss(step(params, dict(zip(names, g))))

    numeric = central_differences(s.phi(), l_meta, h=1e-6)
    rel = (flat(exact) - numeric).norm() / numeric.norm()
    assert numeric.norm() > 0 and rel < 1e-6, rel.item()
    fd, _ = meta_gradient(s.student, s.student_loss, s.meta_loss, s.phi(), lr=0.0, step_fn=step,
                          mode='finite_difference', fd_eps=1e-4)
    rel_fd = (flat(fd) - flat(exact)).norm() / flat(exact).norm()
    assert rel_fd < 1e-3, rel_fd.item()


def test_metakd_option_virtual_step_optimizer(tmp_path):
    from basicsr.models import build_model
    from helpers import tiny_metakd_opt
    import os
    opt = tiny_metakd_opt(tmp_path, meta=dict(virtual_step='optimizer'))
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)
    model = build_model(opt)
    from basicsr.data import build_dataset
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    model.feed_data(torch.utils.data.default_collate([ds[0], ds[1]]))
    model.optimize_parameters(1)
    assert model.get_current_log()['meta_grad_norm'] > 0
    for bad_meta, error, match in ((dict(precond='adam'), KeyError, r'meta\.precond: removed; the virtual step is'),
                                   (dict(virtual_step='plain'), ValueError, r"meta\.virtual_step: 'plain' was removed")):
        bad = tiny_metakd_opt(tmp_path / 'b', meta=dict(bad_meta))
        with pytest.raises(error, match=match):
            build_model(bad)
