"""A KRNet with a FitNet branch contains the best hand-crafted representation and starts there:
MetaKD frozen at initialisation is FitNet + output KD (same losses, gradients and updates)."""
import copy

import pytest
import torch

from krdistill.build import build_distiller, build_metakd, build_optimizer
from test_api import Tiny, _batch

KR = dict(type='KRNet', width=4, num_kernels=4, hidden=8, fitnet_branch=True, learn_fitnet_weight=True)
#: these tests' meta step: every iteration, on the one-step objective unless they say otherwise
ONE_STEP = dict(every=1, objective='one_step')


def _pair(seed=0, meta=None):
    torch.manual_seed(seed)
    teacher, student = Tiny(8, 2), Tiny(4, 1)
    student2 = copy.deepcopy(student)
    mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=KR,
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                       meta=dict(update='frozen') if meta is None else {**ONE_STEP, **meta})
    ref = build_distiller(teacher, student2, ['body.1'], ['body.0'], kd_opt=dict(type='FitNetLoss', loss_weight=1.0),
                          output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                          pixel_opt=dict(type='L1Loss', loss_weight=1.0))
    reg = mkd.krnets[0].regressor
    ref.pair_losses[0].regressor.load_state_dict(reg.state_dict())
    return mkd, ref, student, student2


def test_frozen_at_init_equals_fitnet_plus_output_kd():
    mkd, ref, s1, s2 = _pair()
    lq, gt = _batch(0)
    total, terms, _ = mkd.loss(lq, gt)
    total_ref, terms_ref, _ = ref.loss(lq, gt)
    assert torch.allclose(total, total_ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(terms['l_texture'], terms_ref['l_kd_fitnet'], rtol=1e-6, atol=1e-7)
    assert torch.equal(terms['l_pix'], terms_ref['l_pix']) and torch.equal(terms['l_kd_out'], terms_ref['l_kd_out'])
    mkd.backward(total)
    ref.backward(total_ref)
    for a, b in zip(s1.parameters(), s2.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    assert torch.allclose(mkd.krnets[0].regressor.weight.grad, ref.pair_losses[0].regressor.weight.grad,
                          rtol=1e-5, atol=1e-8)
    # the texture half gets no gradient at init (its weight is 0): it has to be earned by the meta step
    assert mkd.krnets[0].adapter_s.weight.grad is None


def test_frozen_at_init_trains_like_fitnet_plus_output_kd():
    mkd, ref, s1, s2 = _pair()
    opt = torch.optim.Adam(s1.parameters(), 1e-3)
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-3), mkd.kr_parameters())
    opt_ref = torch.optim.Adam(list(s2.parameters()) + ref.kd_parameters(), 1e-3)
    for i in range(3):
        lq, gt = _batch(i)
        a = mkd.train_step(lq, gt, opt, opt_kr)
        b = ref.train_step(lq, gt, opt_ref)
        assert a.skipped is None and b.skipped is None
        assert torch.allclose(a.logs['l_total'], b.logs['l_total'], rtol=1e-5, atol=1e-7), i
    for x, y in zip(s1.parameters(), s2.parameters()):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)
    kr = mkd.krnets[0]
    assert float(kr.texture_weight) == 0.0 and float(kr.fitnet_weight) == 1.0  # frozen: branch weights kept


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_meta_step_can_turn_the_texture_branch_on_or_off(mode):
    mkd, _, s1, _ = _pair(meta=dict(update='meta', mode=mode))
    opt = torch.optim.Adam(s1.parameters(), 1e-2)
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-2), mkd.kr_parameters())
    kr = mkd.krnets[0]
    for i in range(3):
        mkd.train_step(*_batch(i), opt, opt_kr)
    assert kr.texture_weight.grad is None  # cleared after the step
    assert float(kr.fitnet_weight) != 1.0  # the branch weights are meta-learned
    assert kr.regressor.weight.requires_grad and kr.regressor in [m for m in kr.modules()]


def test_branch_weight_below_zero_counts_as_zero_and_still_gets_the_meta_gradient():
    """Straight-through clamp: a b_tex pushed below 0 gives no texture supervision, but the meta
    gradient still reaches it (a plain clamp_min would park it there for good)."""
    mkd, _, s1, _ = _pair(meta=dict(update='meta', mode='exact', virtual_step='optimizer'))
    kr = mkd.krnets[0]
    opt = torch.optim.Adam(s1.parameters(), 1e-2)
    lq, gt = _batch(0)
    with torch.no_grad():
        kr.texture_weight.fill_(-0.1)
    out = kr(*_feats(mkd, lq))
    assert float(out['weights'].abs().max()) == 0.0  # counts as 0
    mkd.objective.meta_grad(lq, gt, *_batch(1), student_optimizer=opt)
    assert kr.texture_weight.grad is not None and float(kr.texture_weight.grad.abs()) > 0


def test_fixed_fitnet_weight_is_not_meta_learned():
    torch.manual_seed(0)
    teacher, student = Tiny(8, 2), Tiny(4, 1)
    mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=dict(KR, learn_fitnet_weight=False),
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0), meta=dict(ONE_STEP, update='meta'))
    kr = mkd.krnets[0]
    assert all(p is not kr.fitnet_weight for p in mkd.kr_parameters())
    assert any(p is kr.texture_weight for p in mkd.meta_kr_parameters())
    with torch.no_grad():
        kr.texture_weight.fill_(0.5)  # away from the projection's bound, so that its meta step shows
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-2), mkd.kr_parameters())
    for i in range(3):
        assert mkd.train_step(*_batch(i), opt, opt_kr).skipped is None
    assert float(kr.fitnet_weight) == 1.0  # fixed: no optimizer holds it
    assert float(kr.texture_weight) != 0.5  # meta-learned
    assert 'fitnet_weight' in kr.state_dict() and 'learn_fitnet_weight=False' in repr(kr)


def _feats(mkd, lq):
    _, feats_t = mkd.teacher_forward(lq)
    _, feats_s = mkd.student_forward(lq)
    return feats_s[0], feats_t[0]


def test_meta_step_projects_the_branch_weights_onto_nonnegative_values():
    mkd, _, s1, _ = _pair(meta=dict(update='meta', mode='exact', virtual_step='optimizer'))
    kr = mkd.krnets[0]
    opt = torch.optim.Adam(s1.parameters(), 1e-2)
    opt_kr = build_optimizer(dict(type='Adam', lr=0.5), mkd.kr_parameters())
    real_step = opt_kr.step

    def step_below_zero(*a, **k):  # the KRNet step, then a push far below 0 (what MetaKD must project)
        out = real_step(*a, **k)
        if kr.texture_weight.grad is None:  # the regressor's step with the student: not a meta step
            return out
        with torch.no_grad():
            kr.texture_weight.sub_(5.0)
            kr.fitnet_weight.sub_(5.0)
        return out

    opt_kr.step = step_below_zero
    values = []
    for i in range(3):
        mkd.train_step(*_batch(i), opt, opt_kr)
        values.append((float(kr.texture_weight.detach()), float(kr.fitnet_weight.detach())))
    assert values == [(0.0, 0.0)] * 3


def test_frozen_at_init_is_fitnet_plus_output_kd_from_the_same_seed_without_copying_the_regressor():
    """Built from the same RNG state, the FitNet branch's regressor is FitNetLoss's regressor value
    for value (it is drawn first), so a frozen MetaKD and FitNet + output KD with the regressor at
    the KRNet optimizer's settings train identically: the control row reproduces the hand-crafted one."""
    torch.manual_seed(0)
    teacher, student = Tiny(8, 2), Tiny(4, 1)
    student2 = copy.deepcopy(student)
    torch.manual_seed(7919)
    mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=KR,
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0), meta=dict(update='frozen'))
    torch.manual_seed(7919)
    ref = build_distiller(teacher, student2, ['body.1'], ['body.0'], kd_opt=dict(type='FitNetLoss', loss_weight=1.0),
                          output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                          pixel_opt=dict(type='L1Loss', loss_weight=1.0))
    reg, reg_ref = mkd.krnets[0].regressor, ref.pair_losses[0].regressor
    assert torch.equal(reg.weight, reg_ref.weight) and torch.equal(reg.bias, reg_ref.bias)
    opt = torch.optim.Adam(student.parameters(), 1e-3, betas=(0.9, 0.99))
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-2, betas=[0.9, 0.999]), mkd.kr_parameters())
    opt_ref = torch.optim.Adam([dict(params=list(student2.parameters())),
                                dict(params=ref.kd_parameters(), lr=1e-2, betas=(0.9, 0.999))], 1e-3, betas=(0.9, 0.99))
    for i in range(4):
        lq, gt = _batch(i)
        a, b = mkd.train_step(lq, gt, opt, opt_kr), ref.train_step(lq, gt, opt_ref)
        assert torch.allclose(a.logs['l_total'], b.logs['l_total'], rtol=1e-6, atol=1e-7), i
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(student.parameters(), student2.parameters()))
    assert torch.allclose(reg.weight, reg_ref.weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('meta', [dict(update='frozen'),
                                  dict(update='meta', every=2, objective='horizon', horizon_stride=2,
                                       horizon_terms='all')])
def test_leaving_out_the_texture_maps_at_zero_texture_weight_changes_nothing(meta):
    """MetaKD leaves a FitNet-branch KRNet's texture maps out of student steps while b_tex = 0 (except
    steps whose gradient to b_tex the horizon traces sample): the run is the same, value for value,
    as one that always computes them -- while b_tex is 0 and after the meta step has raised it."""
    runs = []
    for never_skip in (False, True):
        torch.manual_seed(0)
        mkd, _, student, _ = _pair(meta=dict(meta, virtual_step='optimizer', mode='exact'))
        opt = torch.optim.Adam(student.parameters(), 1e-3)
        opt_kr = build_optimizer(dict(type='Adam', lr=5e-2), mkd.kr_parameters())
        calls = []
        forward = mkd.krnets[0].forward

        def spy(*a, texture='weighted'):  # the reference run computes the maps whatever MetaKD asks
            out = forward(*a, texture='weighted' if never_skip and texture == 'skip_zero' else texture)
            calls.append(out['tex_s'] is None)
            return out

        mkd.krnets[0].forward = spy
        logs, b_tex = [], []
        for i in range(8):
            step = mkd.train_step(*_batch(i), opt, opt_kr)
            assert step.skipped is None
            logs.append(float(step.logs['l_total']))
            b_tex.append(float(mkd.krnets[0].texture_weight))
        runs.append((logs, b_tex, [p.detach().clone() for p in student.parameters()], calls))
    (logs, b_tex, params, calls), (logs_ref, b_tex_ref, params_ref, calls_ref) = runs
    assert any(calls) and not any(calls_ref)  # the maps were left out in some student steps, never in the reference
    assert logs == logs_ref and b_tex == b_tex_ref
    for a, b in zip(params, params_ref):
        assert torch.equal(a, b)
    if meta['update'] == 'meta':
        assert max(b_tex) > 0  # the horizon objective raised b_tex: steps after that computed the maps again


@pytest.mark.parametrize('objective', ['horizon', 'one_step'])
def test_late_start_is_the_frozen_run_until_start_then_meta_learns(objective):
    """``meta.start: S``: up to iteration S the run is value for value the KRNets frozen at init
    (no meta step, no horizon trace); the first meta step is the first multiple of ``every`` after S."""
    start, every, n = 5, 2, 9
    runs = {}
    for name, meta in (('frozen', dict(update='frozen')),
                       ('late', dict(update='meta', objective=objective, every=every, start=start,
                                     horizon_stride=1))):
        torch.manual_seed(0)
        mkd, _, student, _ = _pair(meta=dict(meta, virtual_step='optimizer', mode='exact'))
        opt = torch.optim.Adam(student.parameters(), 1e-3)
        opt_kr = build_optimizer(dict(type='Adam', lr=5e-2), mkd.kr_parameters())
        logs, meta_its, params = [], [], []
        for i in range(1, n + 1):
            step = mkd.train_step(*_batch(i), opt, opt_kr, it=i)
            assert step.skipped is None
            logs.append(float(step.logs['l_total']))
            if any(k in step.logs for k in ('l_meta', 'l_meta_horizon')):
                meta_its.append(i)
            params.append([p.detach().clone() for p in student.parameters()])
        kr = [p.detach().clone() for p in mkd.kr_parameters()]
        runs[name] = (logs, meta_its, params, kr)
    (lf, mf, pf, krf), (ll, ml, pl, krl) = runs['frozen'], runs['late']
    assert mf == [] and ml == [i for i in range(start + 1, n + 1) if i % every == 0]
    assert ll[:start] == lf[:start]
    for a, b in zip(pl[start - 1], pf[start - 1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(krl, krf))  # then the KRNets moved
    if objective == 'horizon':
        assert mkd.objective.steps == n - start  # the traces started with meta-learning


def test_meta_start_is_checked():
    from krdistill.meta_options import check_meta_options
    assert check_meta_options({}).start == 0
    with pytest.raises(ValueError, match=r'meta\.start'):
        check_meta_options(dict(start=-1))
    with pytest.raises(ValueError, match=r'meta\.start'):
        check_meta_options(dict(start=0.5))
