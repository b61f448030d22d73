"""DUKD's data upcycling (krdistill/upcycle.py): the zoom-in and zoom-out targets against a direct
computation on a tiny network, exact inverse augmentations, the option errors, one or two optimizer
steps, every KD term's gradient reaching the student, and the front ends (BasicSR, mmengine, plain)."""
import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import krdistill  # noqa: F401  (shims before basicsr)
from basicsr.archs.edsr_arch import EDSR
from krdistill.build import build_distiller, build_metakd
from krdistill.data_utils import matlab_imresize_uint8
from krdistill.upcycle import (AUGMENTATIONS, Upcycler, augment, bicubic_down, check_upcycle_options, unaugment,
                               zoom_in_tiles)

from helpers import tiny_metakd_opt, tiny_opt


def nets(scale=2, seed=0):
    torch.manual_seed(seed)
    return EDSR(3, 3, 16, 2, upscale=scale).eval(), EDSR(3, 3, 8, 1, upscale=scale)


def all_tiles(gt, s):
    h, w = gt.shape[-2] // s, gt.shape[-1] // s
    return [gt[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(s) for j in range(s)]


# ------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize('scale,n', [(2, 1), (2, 3), (4, 2)])
def test_zoom_in_tiles_are_distinct_gt_tiles_of_their_own_sample(scale, n):
    gt = torch.rand(3, 3, 8 * scale, 8 * scale)
    torch.manual_seed(1)
    tiles = zoom_in_tiles(gt, scale, n)
    assert tiles.shape == (3 * n, 3, 8, 8)
    for b in range(3):
        own = all_tiles(gt[b], scale)
        picked = []
        for k in range(n):
            t = tiles[b * n + k]
            hits = [i for i, o in enumerate(own) if torch.equal(o, t)]
            assert len(hits) == 1, 'each tile is exactly one tile of its own patch'
            picked.append(hits[0])
        assert len(set(picked)) == n, 'the tiles of one patch are distinct'


def test_zoom_in_and_zoom_out_terms_equal_a_direct_computation():
    teacher, student = nets()
    up = Upcycler({'zoom_in': 2, 'zoom_out': True, 'aug_prob': 0.0, 'zoom_in_weight': 0.7, 'zoom_out_weight': 0.3,
                   'zoom_out_pixel_weight': 2.0}, scale=2)
    lq, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    torch.manual_seed(5)
    data = up.teach(teacher, up.inputs(lq, gt))
    terms = up.terms(student, data)
    # direct: the same tiles (same draw), the teacher and the student on them, L1
    torch.manual_seed(5)
    tiles = zoom_in_tiles(gt, 2, 2)
    assert torch.equal(tiles, data.zin)
    with torch.no_grad():
        t_in = teacher(tiles)
    assert torch.allclose(terms['l_zoom_in'], 0.7 * (student(tiles) - t_in).abs().mean())
    down = bicubic_down(lq, 2)
    with torch.no_grad():
        t_out = teacher(down)
    s_out = student(down)
    assert torch.allclose(terms['l_zoom_out_pix'], 2.0 * (s_out - lq).abs().mean())
    assert torch.allclose(terms['l_zoom_out_kd'], 0.3 * (s_out - t_out).abs().mean())
    assert data.zin_t.requires_grad is False and data.zout_t.requires_grad is False


def test_zoom_out_is_matlab_bicubic():
    """The zoomed-out input uses the data's kernel: MATLAB imresize(x, 1/s, 'bicubic'), antialiased."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    for s in (2, 3, 4):
        x = torch.from_numpy(img.astype(np.float64)).permute(2, 0, 1)[None]
        ours = bicubic_down(x, s)[0].permute(1, 2, 0).numpy()
        ref = matlab_imresize_uint8(img, 1 / s)  # bit-exact MATLAB, rounded to uint8 after each axis
        assert ours.shape == ref.shape
        assert np.abs(ours - ref.astype(np.float64)).max() < 1.0
        const = bicubic_down(torch.full((1, 1, 12, 12), 0.25), s)
        assert torch.allclose(const, torch.full_like(const, 0.25))


# ------------------------------------------------------------------------------------------ augmentations
def test_every_augmentation_combination_inverts_exactly():
    x = torch.rand(16, 3, 6, 6)
    ops = torch.tensor(list(itertools.product([False, True], repeat=len(AUGMENTATIONS))))
    assert torch.equal(unaugment(augment(x, ops), ops), x)
    # on a network that commutes with the augmentations (nearest x2 upsampling), the label stays the label
    up = nn.Upsample(scale_factor=2, mode='nearest')
    assert torch.allclose(unaugment(up(augment(x, ops)), ops), up(x))
    # each op does change the input (the test above is not vacuous)
    for k in range(len(AUGMENTATIONS)):
        one = torch.zeros(1, len(AUGMENTATIONS), dtype=torch.bool)
        one[0, k] = True
        assert not torch.equal(augment(x[:1], one), x[:1])


def test_the_references_same_order_undo_is_not_an_inverse():
    """Why we undo in reverse order: applying hflip then transpose again rotates by 180 degrees."""
    x = torch.rand(1, 3, 5, 5)
    ops = torch.tensor([[False, True, False, True]])
    same_order = augment(augment(x, ops), ops)
    assert not torch.equal(same_order, x)
    assert torch.equal(same_order, x.flip(-1).flip(-2))
    assert torch.equal(unaugment(augment(x, ops), ops), x)


# ------------------------------------------------------------------------------------------ steps
@pytest.mark.parametrize('steps', [1, 2])
def test_one_or_two_optimizer_steps(steps):
    teacher, student = nets()
    d = build_distiller(teacher, student, output_kd_opt={'type': 'OutputKDLoss'}, pixel_opt={'type': 'L1Loss'},
                        upcycle_opt={'steps': steps})
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    for _ in range(3):
        step = d.train_step(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16), opt)
        assert step.skipped is None
    assert int(opt.state[next(student.parameters())]['step']) == 3 * steps
    assert ('l_total_upcycle' in step.logs) == (steps == 2)
    assert {'l_pix', 'l_kd_out', 'l_zoom_in', 'l_zoom_out_pix', 'l_zoom_out_kd'} <= set(step.logs)


def test_steps_1_is_one_step_on_the_sum_of_every_term():
    teacher, student = nets()
    twin = copy.deepcopy(student)
    d = build_distiller(teacher, student, output_kd_opt={'type': 'OutputKDLoss'}, pixel_opt={'type': 'L1Loss'},
                        upcycle_opt={'aug_prob': 0.5})
    opt = torch.optim.SGD(student.parameters(), 0.1)
    lq, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    torch.manual_seed(3)
    d.train_step(lq, gt, opt)
    # by hand: the same draws, the summed objective, one SGD step
    torch.manual_seed(3)
    up = d.upcycle.teach(teacher, d.upcycle.inputs(lq, gt))
    with torch.no_grad():
        out_t = teacher(lq)
    sr = twin(lq)
    loss = (sr - gt).abs().mean() + (sr - out_t).abs().mean() + sum(d.upcycle.terms(twin, up).values())
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    for p, q, g in zip(student.parameters(), twin.parameters(), grads):
        assert torch.allclose(p, q - 0.1 * g, atol=1e-6)


# ------------------------------------------------------------------------------------------ gradients
TERM_CONFIGS = {
    'output_kd': dict(output_kd_opt={'type': 'OutputKDLoss'}),
    'fitnet': dict(kd_opt={'type': 'FitNetLoss'}),
    'at': dict(kd_opt={'type': 'ATLoss'}),
    'fakd': dict(kd_opt={'type': 'FAKDLoss'}),
    'dukd': dict(output_kd_opt={'type': 'OutputKDLoss'}, upcycle_opt={'aug_prob': 0.5}),
    'dukd_fitnet': dict(kd_opt={'type': 'FitNetLoss'}, output_kd_opt={'type': 'OutputKDLoss'}, upcycle_opt={}),
}


@pytest.mark.parametrize('name', sorted(TERM_CONFIGS) + ['metakd'])
def test_every_kd_term_sends_a_gradient_to_the_student(name):
    """The reference's FAKD rebuilt its feature losses with torch.tensor([...]), cutting them from the
    graph. Here every KD term of every method, alone, reaches the student's parameters."""
    teacher, student = nets(seed=1)
    if name == 'metakd':
        algo = build_metakd(teacher, student, ['body.1'], ['body.0'], output_kd_opt={'type': 'OutputKDLoss'},
                            network_kr={'type': 'KRNet', 'texture_init': 0.5}, upcycle_opt={})
    else:
        layers = (['body.1'], ['body.0']) if 'kd_opt' in TERM_CONFIGS[name] else ([], [])
        algo = build_distiller(teacher, student, *layers, pixel_opt={'type': 'L1Loss'}, **TERM_CONFIGS[name])
    lq, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
    _, terms, _ = algo.loss(lq, gt, upcycled=algo.upcycled(lq, gt))
    kd = [k for k in terms if k != 'l_pix']
    assert kd, 'the method has KD terms'
    params = [p for p in student.parameters() if p.requires_grad]
    for k in kd:
        assert terms[k].requires_grad, f'{k} is cut from the graph'
        grads = torch.autograd.grad(terms[k], params, retain_graph=True, allow_unused=True)
        norm = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert norm > 0, f'{name}: {k} sends no gradient to the student'


def test_metakd_virtual_step_includes_the_upcycling_terms():
    """With upcycling, MetaKD's one-step meta objective differentiates the same student objective
    as the real step: the upcycled terms change the meta gradient."""
    grads = []
    for with_up in (False, True):
        teacher, student = nets(seed=2)
        torch.manual_seed(0)
        mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr={'type': 'KRNet'},
                           meta={'every': 1, 'objective': 'one_step'},
                           upcycle_opt={'aug_prob': 0.0, 'zoom_in_weight': 5.0} if with_up else None)
        opt = torch.optim.Adam(student.parameters(), 1e-2)
        opt_kr = torch.optim.SGD(mkd.kr_parameters(), 0.0)
        torch.manual_seed(1)
        lq, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16)
        mkd.train_step(lq, gt, opt, opt_kr)
        step = mkd.train_step(lq, gt, opt, opt_kr)
        assert step.skipped is None and ('l_zoom_in' in step.logs) == with_up
        grads.append(float(step.logs['meta_grad_norm']))
    assert grads[0] != pytest.approx(grads[1], rel=1e-4)


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize('opt,match', [
    ({'zoom_inn': 1}, r'upcycle_opt\.zoom_inn: unknown key; did you mean upcycle_opt\.zoom_in'),
    ({'steps': 3}, r'upcycle_opt\.steps'),
    ({'aug_prob': 1.5}, r'upcycle_opt\.aug_prob'),
    ({'zoom_in': 5}, r'upcycle_opt\.zoom_in'),       # more than the 4 tiles of an x2 patch
    ({'zoom_in': 0, 'zoom_out': False}, r'nothing is upcycled'),
    ({'criterion': 'l3'}, r'upcycle_opt\.criterion'),
    ({'zoom_out': 'yes'}, r'upcycle_opt\.zoom_out'),
    ({'zoom_in_weight': -1}, r'upcycle_opt\.zoom_in_weight'),
    ([1], r'upcycle_opt: must be a mapping'),
])
def test_option_errors_name_the_key(opt, match):
    with pytest.raises((KeyError, ValueError, TypeError), match=match):
        check_upcycle_options(opt, 'upcycle_opt', scale=2)


def test_metakd_refuses_two_steps():
    teacher, student = nets()
    with pytest.raises(ValueError, match=r'upcycle_opt\.steps: MetaKD'):
        build_metakd(teacher, student, ['body.1'], ['body.0'], upcycle_opt={'steps': 2})


@pytest.mark.parametrize('model', ['KDSRModel', 'MetaKDModel'])
def test_basicsr_bad_upcycle_option_fails_before_iteration_1(tmp_path, model):
    from krdistill.train import main as train_main
    make = tiny_opt if model == 'KDSRModel' else tiny_metakd_opt
    opt = make(tmp_path, upcycle_opt={'zoom_out': True, 'aug_prop': 0.3},
               **({'output_kd_opt': {'type': 'OutputKDLoss'}} if model == 'KDSRModel' else {}))
    from helpers import write_yaml
    path = write_yaml(opt, tmp_path / 'bad.yml')
    with pytest.raises(KeyError, match=r'train\.upcycle_opt\.aug_prop: unknown key; did you mean '
                                       r'train\.upcycle_opt\.aug_prob'):
        train_main(['-opt', str(path)], root_path=str(tmp_path))
    exp = tmp_path / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth')), 'failed after training started'


# ------------------------------------------------------------------------------------------ front ends
@pytest.mark.parametrize('model', ['KDSRModel', 'MetaKDModel'])
def test_basicsr_models_train_with_upcycling(tmp_path, model):
    from basicsr.data import build_dataset
    from basicsr.models import build_model
    if model == 'KDSRModel':
        opt = tiny_opt(tmp_path, output_kd_opt={'type': 'OutputKDLoss'}, kd_opt={'type': 'FitNetLoss'},
                       upcycle_opt={'zoom_in': 2, 'aug_prob': 0.5})
    else:
        opt = tiny_metakd_opt(tmp_path, upcycle_opt={'zoom_in': 1})
    m = build_model(opt)
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    m.feed_data(torch.utils.data.default_collate([ds[0], ds[1]]))
    before = [p.detach().clone() for p in m.net_g.parameters()]
    m.optimize_parameters(1)
    logs = m.get_current_log()
    assert {'l_zoom_in', 'l_zoom_out_pix', 'l_zoom_out_kd'} <= set(logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.net_g.parameters()))
    assert not any(p.requires_grad for p in m.net_t.parameters())


def test_kd_auto_with_upcycling(tmp_path):
    from basicsr.models import build_model
    opt = tiny_opt(tmp_path, output_kd_opt={'type': 'OutputKDLoss'}, kd_opt={'type': 'FitNetLoss'},
                   upcycle_opt={})
    opt['kd'] = 'auto'
    m = build_model(opt)
    assert m.distiller.upcycle is not None and m.distiller.student_layers


def test_mmengine_model_with_upcycling():
    pytest.importorskip('mmengine')
    from krdistill.mmengine.model import MMEngineMetaKDModel
    teacher, student = nets()
    model = MMEngineMetaKDModel(student, teacher, pairs=[('body.1', 'body.0')], upcycle_opt={'aug_prob': 0.2})
    assert model.mkd.upcycle is not None and model.mkd.upcycle.options.aug_prob == 0.2
    with pytest.raises(KeyError, match=r'model\.upcycle_opt\.zoom'):
        MMEngineMetaKDModel(student, teacher, pairs=[('body.1', 'body.0')], upcycle_opt={'zoom': 1})


def test_plain_loop_example_dukd():
    import plain_loop_example  # tools/ (tests/conftest.py)
    logs = plain_loop_example.main(['--method', 'dukd', '--iters', '2', '--teacher-iters', '1'])
    assert {'l_pix', 'l_kd_out', 'l_zoom_in', 'l_zoom_out_pix', 'l_zoom_out_kd'} <= set(logs)
    assert all(np.isfinite(v) for v in logs.values())
