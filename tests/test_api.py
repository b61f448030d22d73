"""The framework-free MetaKD algorithm (krdistill.metakd.MetaKD, built by krdistill.build) in a
plain loop, and its agreement with BasicSR's MetaKDModel (same losses, same KRNet and student
update for the same weights and batch)."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from krdistill.build import build_metakd, build_optimizer


class Tiny(nn.Module):
    """EDSR-like x2 network with ``body.<i>`` blocks (distillation points)."""

    def __init__(self, nf=8, nb=2):
        super().__init__()
        self.head = nn.Conv2d(3, nf, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(nf, nf, 3, padding=1)) for _ in range(nb)])
        self.up = nn.Sequential(nn.Conv2d(nf, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        f = self.head(x)
        return self.up(self.body(f) + f)


KR = dict(type='KRNet', width=4, num_kernels=4, hidden=8, fitnet_branch=False)
#: these tests' meta step: every iteration, all of the (texture-only) KRNet on the one-step objective
ONE_STEP = dict(every=1, objective='one_step')


def _batch(seed, b=2, size=8):
    g = torch.Generator().manual_seed(seed)
    gt = F.interpolate(torch.rand(b, 3, size // 2, size // 2, generator=g), size=(2 * size, 2 * size),
                       mode='bicubic', align_corners=False).clamp(0, 1)
    return F.interpolate(gt, scale_factor=0.5, mode='bicubic', antialias=True, align_corners=False), gt


def MetaKD(teacher, student, pairs, optim_kr=None, **kw):
    """build_metakd plus the KRNets' optimizer (kept as ``mkd.opt_kr`` for these tests)."""
    kw['meta'] = {**ONE_STEP, **(kw.get('meta') or {})}
    mkd = build_metakd(teacher, student, [p[0] for p in pairs], [p[1] for p in pairs], **kw)
    mkd.opt_kr = build_optimizer(optim_kr or dict(type='Adam', lr=1e-4), mkd.kr_parameters())
    return mkd


def _make(meta=None, seed=0, **kw):
    torch.manual_seed(seed)
    teacher, student = Tiny(8, 2), Tiny(4, 1)
    mkd = MetaKD(teacher, student, [('body.1', 'body.0')], network_kr=KR, optim_kr=dict(type='Adam', lr=1e-2),
                 meta=meta, **kw)
    return mkd, teacher, student


def _step(mkd, lq, gt, opt, **kw):
    return mkd.train_step(lq, gt, opt, mkd.opt_kr, **kw).logs


def _meta_update(mkd, lq, gt, lq_m=None, gt_m=None, student_optimizer=None):
    """The meta half of an iteration: meta gradient on the meta batch, one KRNet step."""
    if lq_m is None:
        lq_m, gt_m = mkd.meta_batch(lq, gt)
    mkd.opt_kr.zero_grad(set_to_none=True)
    info = mkd.objective.meta_grad(lq, gt, lq_m, gt_m, student_optimizer=student_optimizer)
    mkd.opt_kr.step()
    return info


def _snap(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_decreases_in_a_plain_loop():
    mkd, teacher, student = _make()
    t0 = _snap(teacher)
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    lq, gt = _batch(0)
    first = None
    for _ in range(15):
        logs = _step(mkd, lq, gt, opt)
        first = first if first is not None else logs
    assert {'l_total', 'l_pix', 'l_texture', 'l_meta', 'meta_grad_norm', 't_meta'} <= set(logs)
    assert all(not v.requires_grad for v in logs.values())
    assert logs['l_pix'] < 0.7 * first['l_pix']
    assert logs['l_total'] < first['l_total']
    assert _same(_snap(teacher), t0)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_meta_update_changes_only_the_krnets(mode):
    mkd, teacher, student = _make(meta=dict(mode=mode))
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    _step(mkd, *_batch(0), opt)  # give the student optimizer some state
    t0, s0, k0, o0 = _snap(teacher), _snap(student), _snap(mkd.krnets), copy.deepcopy(opt.state_dict())
    grads0 = [None if p.grad is None else p.grad.clone() for p in student.parameters()]
    info = _meta_update(mkd, *_batch(1), student_optimizer=opt)
    assert info['meta_grad_norm'] > 0
    assert _same(_snap(student), s0), 'the meta update changed the student'
    assert all((g0 is None and p.grad is None) or torch.equal(g0, p.grad)
               for g0, p in zip(grads0, student.parameters())), 'the meta update touched student grads'
    assert _same(_snap(teacher), t0)
    assert not _same(_snap(mkd.krnets), k0), 'the meta update did not change the KRNets'
    assert str(opt.state_dict()) == str(o0)


def test_loss_terms_and_backward_route_gradients():
    mkd, teacher, student = _make()
    lq, gt = _batch(0)
    total, terms, sr = mkd.loss(lq, gt)
    assert list(terms) == ['l_pix', 'l_texture'] and sr.shape == gt.shape
    assert torch.allclose(total, terms['l_pix'] + terms['l_texture'])
    mkd.backward(total)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in mkd.kr_parameters())  # update='meta': KRNets only via the meta step
    assert all(p.grad is None for p in teacher.parameters())


def test_state_round_trip_gives_identical_next_meta_update():
    mkd, teacher, student = _make()
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    for s in (0, 1):
        _step(mkd, *_batch(s), opt)
    buf = io.BytesIO()
    torch.save({'student': student.state_dict(), 'opt': opt.state_dict(), 'metakd': mkd.training_state_dict(),
                'opt_kr': mkd.opt_kr.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # tensors and plain containers only

    torch.manual_seed(123)  # a fresh object: other initial KRNets and student, the same (trained) teacher
    student2 = Tiny(4, 1)
    fresh = MetaKD(teacher, student2, [('body.1', 'body.0')], network_kr=KR, optim_kr=dict(type='Adam', lr=1e-2))
    assert not _same(_snap(fresh.krnets), _snap(mkd.krnets))
    student2.load_state_dict(ckpt['student'])
    opt2 = torch.optim.Adam(student2.parameters(), 1e-2)
    opt2.load_state_dict(ckpt['opt'])
    fresh.load_training_state_dict(ckpt['metakd'])
    fresh.opt_kr.load_state_dict(ckpt['opt_kr'])
    assert _same(_snap(fresh.krnets), _snap(mkd.krnets))
    assert str(fresh.opt_kr.state_dict()) == str(mkd.opt_kr.state_dict())

    lq, gt = _batch(2)
    a = _meta_update(mkd, lq, gt, student_optimizer=opt)      # meta batch: the previous batch (_batch(1))
    b = _meta_update(fresh, lq, gt, student_optimizer=opt2)   # restored from the state
    assert torch.equal(a['l_meta'], b['l_meta'])
    assert _same(_snap(fresh.krnets), _snap(mkd.krnets))
    assert fresh.opt_kr.state_dict()['state'][0]['step'] == 3


def test_every_meta_batch_sources_joint_and_frozen():
    mkd, _, student = _make(meta=dict(every=2))
    opt = torch.optim.SGD(student.parameters(), 0.1)
    k0 = _snap(mkd.krnets)
    assert 'l_meta' not in _step(mkd, *_batch(0), opt)                       # call 1: no meta step
    assert _same(_snap(mkd.krnets), k0)
    lq, gt = _batch(1)
    assert mkd.meta_batch(lq, gt)[0] is not lq                              # the previous batch (_batch(0))
    assert torch.equal(mkd.meta_batch(lq, gt)[0], _batch(0)[0])
    explicit = _meta_update(mkd, lq, gt, *_batch(5), student_optimizer=opt)  # explicit meta batch
    k = _snap(mkd.krnets)
    fallback = _step(mkd, lq, gt, opt)                                       # call 2: meta step, previous batch
    assert not torch.equal(explicit['l_meta'], fallback['l_meta'])
    assert not _same(_snap(mkd.krnets), k)

    held_out = [_batch(7)]
    mkd2, _, student2 = _make(meta_data=held_out)
    lq, gt = _batch(1)
    info = _meta_update(mkd2, lq, gt, *mkd2.meta_batch(lq, gt), student_optimizer=torch.optim.SGD(student2.parameters(), 0.05))
    ref, _, student_ref = _make()
    assert torch.equal(info['l_meta'], _meta_update(ref, *_batch(1), *held_out[0],
                                                    student_optimizer=torch.optim.SGD(student_ref.parameters(), 0.05))['l_meta'])

    joint, _, s3 = _make(meta=dict(update='joint'))
    k3 = _snap(joint.krnets)
    logs = _step(joint, *_batch(0), torch.optim.SGD(s3.parameters(), 0.1))
    assert 'l_meta' not in logs and not _same(_snap(joint.krnets), k3)
    frozen, _, s4 = _make(meta=dict(update='frozen'))
    k4 = _snap(frozen.krnets)
    _step(frozen, *_batch(0), torch.optim.SGD(s4.parameters(), 0.1))
    assert _same(_snap(frozen.krnets), k4)


def test_option_errors_name_the_key():
    teacher, student = Tiny(8, 2), Tiny(4, 1)
    with pytest.raises(KeyError, match=r"student_layers.*body\.0"):
        MetaKD(teacher, student, [('body.1', 'body.9')])
    with pytest.raises(KeyError, match=r'network_kr\.s_channels'):
        MetaKD(teacher, student, [('body.1', 'body.0')], network_kr=dict(type='KRNet', s_channels=4))
    with pytest.raises(KeyError, match=r'pixel_opt\.type'):
        MetaKD(teacher, student, [('body.1', 'body.0')], pixel_opt=dict(type='NoSuchLoss'))
    with pytest.raises(NotImplementedError, match=r'optim_kr\.type'):
        MetaKD(teacher, student, [('body.1', 'body.0')], optim_kr=dict(type='Lion', lr=1e-4))
    with pytest.raises(ValueError, match=r'meta\.mode'):
        MetaKD(teacher, student, [('body.1', 'body.0')], meta=dict(mode='second_order'))
    with pytest.raises(ValueError, match='distillation point'):
        MetaKD(teacher, student, [])
    # modules and classes are accepted as they are
    mkd = MetaKD(teacher, student, [('body.1', 'body.0')], pixel_opt=nn.MSELoss(), network_kr=KR,
                 output_kd_opt=dict(type='OutputKDLoss', loss_weight=0.5))
    _, terms, _ = mkd.loss(*_batch(0))
    assert list(terms) == ['l_pix', 'l_texture', 'l_kd_out']


def test_plain_loop_example_runs(capsys):
    import plain_loop_example  # tools/ (tests/conftest.py)
    logs = plain_loop_example.main(['--iters', '2', '--teacher-iters', '1'])
    assert {'l_pix', 'l_texture', 'l_meta'} <= set(logs)
    assert 'iter   2' in capsys.readouterr().out


# ------------------------------------------------------------------ agreement with BasicSR
def test_same_losses_and_updates_as_basicsr_metakd_model(tmp_path):
    """MetaKDModel (BasicSR) and MetaKD (plain loop) on the same weights and batches: same l_pix /
    l_texture / l_meta, same KRNet and student parameters after each of two iterations (the second
    uses the previous batch as meta batch in both)."""
    from basicsr.data import build_dataset
    from basicsr.models import build_model
    from helpers import tiny_metakd_opt

    opt = tiny_metakd_opt(tmp_path)
    model = build_model(opt)
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    batches = [torch.utils.data.default_collate([ds[i] for i in idx]) for idx in ((0, 1), (2, 3))]

    student = copy.deepcopy(model.net_g)
    kr_opt = {k: v for k, v in opt['network_kr'].items()}
    mkd = MetaKD(model.net_t, student, list(zip(opt['kd']['teacher_layers'], opt['kd']['student_layers'])),
                 network_kr=kr_opt, texture_opt=opt['train']['texture_opt'], pixel_opt=opt['train']['pixel_opt'],
                 optim_kr=opt['train']['optim_kr'], meta=opt['meta'])
    assert type(mkd.pixel_loss) is type(model.distiller.pixel_loss)  # the same builder and registry
    mkd.krnets.load_state_dict(model.net_kr.state_dict())
    g = copy.deepcopy(opt['train']['optim_g'])
    opt_s = getattr(torch.optim, g.pop('type'))(student.parameters(), **g)
    assert _same(_snap(student), _snap(model.net_g)) and _same(_snap(mkd.krnets), _snap(model.net_kr))

    for it, data in enumerate(batches, 1):
        model.feed_data(data)
        model.optimize_parameters(it)
        ref = model.get_current_log()
        logs = _step(mkd, data['lq'], data['gt'], opt_s, it=it)
        for key in ('l_pix', 'l_texture', 'l_meta', 'meta_grad_norm'):
            assert torch.allclose(torch.tensor(ref[key]), logs[key].float(), rtol=1e-6, atol=1e-8), (it, key)
        for a, b in zip(model.net_kr.parameters(), mkd.krnets.parameters()):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), f'KRNet differs after iteration {it}'
        for a, b in zip(model.net_g.parameters(), student.parameters()):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), f'student differs after iteration {it}'
