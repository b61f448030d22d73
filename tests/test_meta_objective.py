"""The meta objectives: the one-step ``L_meta = L_pix(S_theta'(x_m), y_m)`` after the student
optimizer's real step (its meta gradient matches central finite differences in float64) and the
horizon objective's hypergradients (``meta.objective: horizon``)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import central_differences
from krdistill.build import build_metakd, build_optimizer
from krdistill.meta import optimizer_step, student_params
from krdistill.meta_options import check_meta_options
from test_api import Tiny, _batch

KR = dict(type='KRNet', width=4, num_kernels=2, hidden=4, fitnet_branch=True, texture_init=0.5,
          learn_fitnet_weight=False)


def _setup(dtype=torch.float64):
    torch.manual_seed(0)
    teacher, student = Tiny(6, 2).to(dtype), Tiny(4, 1).to(dtype)
    mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=KR,
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0, criterion='charbonnier', eps=0.01),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                       meta=dict(update='meta', objective='one_step', virtual_step='optimizer'))
    mkd.to(dtype)
    opt = torch.optim.Adam(student.parameters(), 1e-2, betas=(0.9, 0.99))
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-2), mkd.kr_parameters())
    return mkd, student, opt, opt_kr


def _data(i, dtype=torch.float64):
    return tuple(t.to(dtype) for t in _batch(i, b=2, size=8))


def test_meta_objective_gradient_matches_finite_differences():
    mkd, student, opt, opt_kr = _setup()
    for i in range(2):  # Adam state, as in training
        assert mkd.train_step(*_data(i), opt, opt_kr).skipped is None
    lq, gt = _data(5)
    lq_m, gt_m = _data(6)
    phi = mkd.meta_kr_parameters()
    assert phi and all(p is not mkd.krnets[0].fitnet_weight for p in phi)
    mkd.objective.meta_grad(lq, gt, lq_m, gt_m, student_optimizer=opt)
    exact = torch.cat([p.grad.reshape(-1) for p in phi])
    step = optimizer_step(opt, student.named_parameters())
    teacher = mkd.teacher_forward(lq)

    def l_meta():  # written out: the student's real Adam step on L_S, then the meta loss
        params = {n: p.detach().requires_grad_(True) for n, p in student_params(student).items()}
        names = list(params)
        g = torch.autograd.grad(mkd.loss(lq, gt, teacher, params)[0], [params[n] for n in names])
        with torch.no_grad():
            sr = torch.func.functional_call(student, step(params, dict(zip(names, g))), (lq_m,))
            return F.l1_loss(sr, gt_m)

    numeric = central_differences(phi, l_meta, h=1e-6)
    rel = (exact - numeric).norm() / numeric.norm()
    assert numeric.norm() > 0 and rel < 1e-5, rel.item()


# ---------------------------------------------------------------- meta.objective: horizon
from krdistill.meta import HorizonTrace  # noqa: E402


@pytest.mark.parametrize('opt_name', ['SGD', 'SGD-momentum', 'SGD-nesterov'])
def test_horizon_trace_is_exact_for_sgd_on_a_linear_objective(opt_name):
    """L_S = a.theta + lam * b.theta (linear in theta): the first-order trace is exact, so the
    hypergradient equals central finite differences of L_meta after T real optimizer steps."""
    torch.manual_seed(0)
    n, T = 7, 6
    a, b, c, theta0 = (torch.randn(n, dtype=torch.float64) for _ in range(4))
    kw = {'SGD': {}, 'SGD-momentum': dict(momentum=0.9, dampening=0.1),
          'SGD-nesterov': dict(momentum=0.9, nesterov=True)}[opt_name]

    def run(lam, trace=None):
        theta = torch.nn.Parameter(theta0.clone())
        opt = torch.optim.SGD([theta], lr=0.05, **kw)
        for _ in range(T):
            opt.zero_grad()
            (a @ theta + lam * (b @ theta)).backward()
            opt.step()
            if trace is not None:
                trace.update(opt, {'theta': theta}, [{'theta': b.clone()}])
        return theta.detach()

    tr = HorizonTrace(['theta'], 1, decay=1.0)
    theta = run(0.3, tr)
    meta_grad = 2 * (theta - c)  # L_meta = |theta - c|^2
    hyper = tr.hypergradient({'theta': meta_grad})[0]
    h = 1e-5
    numeric = (((run(0.3 + h) - c)**2).sum() - ((run(0.3 - h) - c)**2).sum()) / (2 * h)
    assert torch.allclose(hyper, numeric, rtol=1e-7), (hyper, numeric)


def _horizon_setup(lr, decay=1.0, **meta):
    torch.manual_seed(0)
    teacher, student = Tiny(6, 2).double(), Tiny(4, 1).double()
    mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=dict(KR, learn_fitnet_weight=True),
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0, criterion='charbonnier', eps=0.01),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                       meta=dict(dict(update='meta', objective='horizon', horizon_decay=decay, every=10**6,
                                      horizon_stride=1, horizon_terms='all'), **meta))
    mkd.double()
    opt = torch.optim.Adam(student.parameters(), lr, betas=(0.9, 0.999))
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-2), mkd.kr_parameters())
    return mkd, student, opt, opt_kr


def _horizon_error(lr, T=5, warm=20):
    """Relative error of the horizon hypergradient of (b_tex, b_fit) against central finite
    differences over T real Adam steps (after `warm` steps that build Adam's state)."""
    mkd, student, opt, opt_kr = _horizon_setup(lr)
    # the traces follow the student; the FitNet regressor (stepped by opt_kr on the student objective) also
    # depends on b_fit, which they do not trace: keep it fixed here to check what they claim
    mkd.krnets[0].regressor.requires_grad_(False)
    for i in range(warm):
        mkd.train_step(*_data(i), opt, opt_kr)
    lq_m, gt_m = _data(99)
    start = copy.deepcopy((mkd.krnets.state_dict(), student.state_dict(), opt.state_dict(), opt_kr.state_dict()))

    def l_meta_after(delta):  # T real steps with the branch weights moved by delta, then L_meta
        mkd.krnets.load_state_dict(start[0])
        student.load_state_dict(start[1])
        opt.load_state_dict(copy.deepcopy(start[2]))  # (load_state_dict keeps the given tensors)
        opt_kr.load_state_dict(copy.deepcopy(start[3]))  # the regressor is stepped with the student
        kr = mkd.krnets[0]
        with torch.no_grad():
            kr.texture_weight.add_(delta[0])
            kr.fitnet_weight.add_(delta[1])
        mkd.objective.trace = HorizonTrace(mkd.objective.trace.names, 2, 1.0)
        for i in range(T):
            assert mkd.train_step(*_data(warm + i), opt, opt_kr, it=1).skipped is None
        with torch.no_grad():
            return F.l1_loss(student(lq_m), gt_m)

    l_meta_after((0.0, 0.0))
    got = torch.stack([-mkd.objective.horizon_grad(lq_m, gt_m)[f'kr0_b_{t}_credit'].double() for t in ('tex', 'fit')])
    h = 1e-5
    want = torch.stack([(l_meta_after(d) - l_meta_after(tuple(-x for x in d))) / (2 * h)
                        for d in ((h, 0.0), (0.0, h))])
    return ((got - want).norm() / want.norm()).item()


def test_horizon_hypergradient_matches_finite_differences_through_real_adam_steps():
    """Through the real Adam trajectory (nonlinear student, float64): exact for one step (the traces
    drop only the Hessian, which enters from the second step on), and close to finite differences
    over 5 steps, closest at the smallest step size."""
    assert _horizon_error(1e-3, T=1) < 1e-6
    tiny, small, large = _horizon_error(1e-5), _horizon_error(1e-4), _horizon_error(1e-3)
    assert tiny < 0.005, tiny
    assert small < 0.02 and large < 0.02, (small, large)
    assert tiny < small, (tiny, small)


def test_horizon_objective_trains_the_branch_weights_and_resumes_its_traces():
    mkd, student, opt, opt_kr = _horizon_setup(1e-2, decay=0.9, every=2)
    kr = mkd.krnets[0]
    b0 = (float(kr.texture_weight), float(kr.fitnet_weight))
    logs = [mkd.train_step(*_data(i), opt, opt_kr).logs for i in range(4)]
    assert 'kr0_b_tex_credit' in logs[1] and 'kr0_b_tex_credit' not in logs[0]
    assert (float(kr.texture_weight), float(kr.fitnet_weight)) != b0
    assert all(p is not kr.texture_weight for p in mkd.objective.one_step_parameters())
    state = mkd.meta_state_dict()
    other, *_ = _horizon_setup(1e-2, decay=0.9, every=2)
    other.load_meta_state_dict(state)
    z, z2 = mkd.objective.trace.z[0], other.objective.trace.z[0]
    assert z and all(torch.equal(z[n], z2[n]) for n in z)
    with pytest.raises(ValueError, match=r'meta\.objective: horizon .*fitnet_branch'):
        build_metakd(Tiny(6, 2), Tiny(4, 1), ['body.1'], ['body.0'], network_kr=dict(type='KRNet', width=4, fitnet_branch=False),
                     meta=dict(objective='horizon'))
    with pytest.raises(ValueError, match=r'meta\.horizon_decay'):
        check_meta_options(dict(horizon_decay=1.5))


def test_horizon_stride_samples_the_term_gradients_and_scales_them():
    mkd, student, opt, opt_kr = _horizon_setup(1e-3, horizon_stride=3)
    seen = []
    orig = mkd._after_step

    def spy(optimizer, pending):
        seen.append((pending['grads'] is not None, pending['scale']))
        return orig(optimizer, pending)

    mkd._after_step = spy
    for i in range(5):
        mkd.train_step(*_data(i), opt, opt_kr, it=1)
    assert seen == [(True, 3.0), (False, 0.0), (False, 0.0), (True, 3.0), (False, 0.0)]
    assert mkd.objective.trace.z[0]  # the traces advance at every step
    with pytest.raises(ValueError, match=r'meta\.horizon_stride'):
        check_meta_options(dict(horizon_stride=0))


def test_horizon_kernels_learn_while_the_texture_branch_is_off():
    """Under meta.objective: horizon the kernels' one-step meta gradient is taken with the texture
    term at unit weight, so they are trained while b_tex <= 0 (with b_tex = 0 the student's
    gradient does not depend on them and a plain meta gradient would be 0)."""
    torch.manual_seed(0)
    teacher, student = Tiny(6, 2), Tiny(4, 1)
    grads = {}
    for objective in ('one_step', 'horizon'):
        torch.manual_seed(0)
        teacher, student = Tiny(6, 2), Tiny(4, 1)
        mkd = build_metakd(teacher, student, ['body.1'], ['body.0'],
                           network_kr=dict(KR, texture_init=0.0, learn_fitnet_weight=False),
                           output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                           meta=dict(update='meta', objective=objective, virtual_step='optimizer'))
        opt = torch.optim.Adam(student.parameters(), 1e-2)
        mkd.objective.meta_grad(*_batch(0), *_batch(1), student_optimizer=opt)
        kr = mkd.krnets[0]
        grads[objective] = kr.kernel_head.bias.grad.abs().sum().item()
        assert float(kr(*[torch.randn(1, c, 4, 4) for c in (4, 6)])['weights'].abs().sum()) == 0.0
    assert grads['one_step'] == 0.0 and grads['horizon'] > 0


def test_horizon_terms_one_takes_one_branch_term_per_sampled_step_in_turn():
    """``horizon_terms: one``: on each sampled step only one branch term's gradient is computed,
    in turn, times the number of terms (an unbiased subsample at one backward per step)."""
    runs = {}
    for terms in ('all', 'one'):
        mkd, student, opt, opt_kr = _horizon_setup(1e-3, horizon_terms=terms, horizon_stride=2)
        seen = []
        orig = mkd._after_step

        def spy(optimizer, pending, orig=orig, seen=seen):
            seen.append(pending['grads'])
            return orig(optimizer, pending)

        mkd._after_step = spy
        for i in range(5):
            mkd.train_step(*_data(i), opt, opt_kr, it=1)
        runs[terms] = seen
    one, all_ = runs['one'], runs['all']
    assert [g is None for g in one] == [False, True, False, True, False]
    assert [[bool(d) for d in g] for g in one if g is not None] == [[True, False], [False, True], [True, False]]
    first = one[0][0]  # step 1, same state in both runs: b_tex's term, times 2
    assert first and all(torch.allclose(first[n], 2 * all_[0][0][n]) for n in first)
    with pytest.raises(ValueError, match=r'meta\.horizon_terms'):
        check_meta_options(dict(horizon_terms='some'))
