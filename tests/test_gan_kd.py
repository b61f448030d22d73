"""Distillation inside BasicSR's GAN training (krdistill/models/gan_kd_model.py), on tiny CPU data.

No VGG/LPIPS weights can be fetched here: every run is without ``train.perceptual_opt`` (the
perceptual term goes through the same ``pixel_terms`` code as the pixel and GAN terms).
"""
import copy
import sys

import pytest
import torch

from helpers import tiny_metakd_opt, tiny_opt, write_yaml
from basicsr.data import build_dataset
from basicsr.models import build_model
from krdistill.train import main as train_main

CPU_MODELS = ['KDSRGANModel', 'KDESRGANModel', 'MetaKDSRGANModel', 'MetaKDESRGANModel']
TINY_D = dict(type='UNetDiscriminatorSN_basicsr', num_in_ch=3, num_feat=4, skip_connection=True)


def gan_opt(tmp_path, model_type='KDSRGANModel', ema_decay=0.9, total_iter=4, **train_extra):
    """``tiny_opt`` / ``tiny_metakd_opt`` plus BasicSR's GAN blocks (tiny discriminator, no perceptual loss)."""
    if model_type.startswith('Meta'):
        opt = tiny_metakd_opt(tmp_path, total_iter=total_iter, **train_extra)
    else:
        extra = dict(output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                     kd_opt=dict(type='FitNetLoss', loss_weight=0.1))
        extra.update(train_extra)
        opt = tiny_opt(tmp_path, total_iter=total_iter, **extra)
    opt['model_type'] = model_type
    opt['network_d'] = copy.deepcopy(TINY_D)
    opt['train'].update(optim_d=dict(type='Adam', lr=1e-3, betas=[0.9, 0.99]), ema_decay=ema_decay,
                        gan_opt=dict(type='GANLoss', gan_type='vanilla', real_label_val=1.0, fake_label_val=0.0,
                                     loss_weight=0.1), net_d_iters=1, net_d_init_iters=0)
    return opt


def _batch(opt, first=0):
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    return torch.utils.data.default_collate([ds[first], ds[first + 1]])


# ----------------------------------------------------------------- a few iterations, public entry point
@pytest.mark.parametrize('model_type', CPU_MODELS)
def test_gan_kd_runs_through_train_entry(tmp_path, monkeypatch, model_type):
    monkeypatch.chdir(tmp_path)
    opt = gan_opt(tmp_path, model_type, total_iter=4)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=4)
    opt['val']['val_freq'] = 4
    train_main(['-opt', str(write_yaml(opt, tmp_path / 'g.yml'))], root_path=str(tmp_path))
    run = tmp_path / 'experiments' / opt['name']
    models = sorted(p.name for p in (run / 'models').iterdir())
    assert 'net_g_4.pth' in models and 'net_d_4.pth' in models
    assert not any(n.startswith('net_t') for n in models)  # the teacher is never saved
    assert torch.load(run / 'models' / 'net_g_4.pth', weights_only=True).keys() == {'params', 'params_ema'}
    log = ''.join(p.read_text() for p in run.glob('train_*.log'))
    for key in ('l_g_pix', 'l_g_gan', 'l_d_real', 'l_d_fake'):
        assert key in log
    assert ('l_texture' if model_type.startswith('Meta') else 'l_kd_out') in log
    state = torch.load(run / 'training_states' / '4.state', weights_only=True)
    assert len(state['optimizers']) == (3 if model_type.startswith('Meta') else 2)  # g, [kr,] d


# ----------------------------------------------------------------- BasicSR's GAN arithmetic, value for value
@pytest.mark.parametrize('ours,theirs', [('KDSRGANModel', 'SRGANModel'), ('KDESRGANModel', 'ESRGANModel')])
def test_kd_weight_zero_is_basicsr_value_for_value(tmp_path, ours, theirs):
    opt = gan_opt(tmp_path, ours, output_kd_opt=dict(type='OutputKDLoss', loss_weight=0.0),
                  kd_opt=dict(type='FitNetLoss', loss_weight=0.0))
    opt['train']['optim_g']['lr'] = 1e-2  # visible steps
    ref_opt = copy.deepcopy(opt)
    ref_opt['model_type'] = theirs
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(opt))
    ref = build_model(ref_opt)
    for a, b in ((model.net_g, ref.net_g), (model.net_d, ref.net_d), (model.net_g_ema, ref.net_g_ema)):
        a.load_state_dict(b.state_dict())
    batches = [_batch(opt, 0), _batch(opt, 2), _batch(opt, 0)]
    for it, batch in enumerate(batches, 1):
        torch.manual_seed(it)
        model.feed_data(batch)
        model.optimize_parameters(it)
        torch.manual_seed(it)
        ref.feed_data(batch)
        ref.optimize_parameters(it)
        ours_log, ref_log = model.get_current_log(), ref.get_current_log()
        for key, value in ref_log.items():
            assert ours_log[key] == value, f'iter {it} {key}: {ours_log[key]} != {value}'
    for name in ('net_g', 'net_d', 'net_g_ema'):
        for k, v in getattr(ref, name).state_dict().items():
            assert torch.equal(getattr(model, name).state_dict()[k], v), f'{name}.{k}'


# ----------------------------------------------------------------- every KD term reaches the generator
@pytest.mark.parametrize('model_type,kd_opt', [
    ('KDSRGANModel', dict(type='FitNetLoss', loss_weight=0.1)),
    ('KDESRGANModel', dict(type='ATLoss', loss_weight=10.0)),
    ('KDSRGANModel', dict(type='FAKDLoss', loss_weight=1.0)),
    ('MetaKDESRGANModel', None),
])
def test_every_kd_term_sends_gradient_to_the_generator(tmp_path, model_type, kd_opt):
    extra = {} if kd_opt is None else dict(kd_opt=kd_opt)
    opt = gan_opt(tmp_path, model_type, output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0), **extra)
    model = build_model(opt)
    teacher_before = {k: v.clone() for k, v in model.net_t.state_dict().items()}
    model.feed_data(_batch(opt))
    dist = model.distiller
    point = {'texture': 'weighted'} if model_type.startswith('Meta') else None
    for p in model.net_d.parameters():
        p.requires_grad = False
    _, terms, _ = dist.loss(model.lq, model.gt, point_kwargs=point)
    kd_terms = [k for k in terms if not k.startswith('l_g_')]
    assert 'l_kd_out' in kd_terms and len(kd_terms) == 2, terms.keys()
    assert list(terms)[:2] == ['l_g_pix', 'l_g_gan']
    params = [p for p in model.net_g.parameters() if p.requires_grad]
    for key in kd_terms + ['l_g_gan']:
        grads = torch.autograd.grad(terms[key], params, retain_graph=True, allow_unused=True)
        total = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert total > 0, f'{key} sends no gradient to the generator'
    for p in model.net_d.parameters():
        p.requires_grad = True
    d_before = {k: v.clone() for k, v in model.net_d.state_dict().items()}
    model.optimize_parameters(1)
    assert all(p.grad is None for p in model.net_t.parameters())
    for k, v in model.net_t.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f'teacher changed: {k}'
    assert any(not torch.equal(v, d_before[k]) for k, v in model.net_d.state_dict().items())  # D stepped


# ----------------------------------------------------------------- exact resume with the discriminator
@pytest.mark.parametrize('model_type', ['KDSRGANModel', 'MetaKDESRGANModel'])
def test_exact_resume_with_discriminator(tmp_path, monkeypatch, model_type):
    from krdistill.models import gan_kd_model
    monkeypatch.chdir(tmp_path)
    total, save_every, stop_at = 10, 5, 7
    cls = getattr(gan_kd_model, model_type)
    record = {}
    orig = cls.optimize_parameters

    def optimize_parameters(self, current_iter):
        if record.get('stop_at') == current_iter:
            raise KeyboardInterrupt
        orig(self, current_iter)
        record['run'].append((current_iter, {k: float(v) for k, v in self.log_dict.items() if not k.startswith('t_')}))

    monkeypatch.setattr(cls, 'optimize_parameters', optimize_parameters)

    def options(name):
        opt = gan_opt(tmp_path, model_type, total_iter=total)
        if model_type.startswith('Meta'):
            opt['meta']['every'] = 2
        opt['name'] = name
        opt['datasets']['train']['dataset_enlarge_ratio'] = 2
        opt['val']['val_freq'] = 1000
        opt['logger'].update(print_freq=100, save_checkpoint_freq=save_every)
        return write_yaml(opt, tmp_path / f'{name}.yml')

    record['run'] = straight = []
    train_main(['-opt', str(options('straight'))], root_path=str(tmp_path))
    record['run'] = []
    record['stop_at'] = stop_at
    yml = options('interrupted')
    with pytest.raises(KeyboardInterrupt):
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    record['run'] = after = []
    record['stop_at'] = None
    train_main(['-opt', str(yml), '--auto_resume'], root_path=str(tmp_path))
    assert [it for it, _ in after] == list(range(save_every + 1, total + 1))
    assert after == straight[save_every:]
    for net in ('net_g', 'net_d'):
        a = torch.load(tmp_path / 'experiments' / 'straight' / 'models' / f'{net}_latest.pth', weights_only=True)
        b = torch.load(tmp_path / 'experiments' / 'interrupted' / 'models' / f'{net}_latest.pth', weights_only=True)
        assert a.keys() == b.keys() and ('params_ema' in a) == (net == 'net_g')
        for key in a:
            for k, v in a[key].items():
                assert torch.equal(v, b[key][k]), f'{net}.{key}.{k}'


# ----------------------------------------------------------------- the student in vanilla BasicSR
def test_export_loads_into_vanilla_basicsr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = gan_opt(tmp_path, 'KDESRGANModel', total_iter=3)
    opt['logger'].update(save_checkpoint_freq=3)
    train_main(['-opt', str(write_yaml(opt, tmp_path / 'e.yml'))], root_path=str(tmp_path))
    run = tmp_path / 'experiments' / opt['name']
    sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1] / 'tools'))
    try:
        from export_student import main as export_main
    finally:
        sys.path.pop(0)
    assert export_main([str(run), '-o', str(tmp_path / 'student.pth')]) == 0
    saved = torch.load(run / 'models' / 'net_g_latest.pth', weights_only=True)
    lq = _batch(opt)['lq']
    for model_type, key in (('SRGANModel', 'params_ema'), ('ESRGANModel', 'params'), ('SRModel', 'params')):
        test_opt = dict(name='t', model_type=model_type, scale=2, num_gpu=0, is_train=False, dist=False,
                        network_g=copy.deepcopy(opt['network_g']),
                        path=dict(pretrain_network_g=str(tmp_path / 'student.pth'), param_key_g=key,
                                  strict_load_g=True))
        vanilla = build_model(test_opt)
        assert type(vanilla).__name__ == model_type
        vanilla.net_g.eval()
        ours = build_model(dict(copy.deepcopy(test_opt), model_type='KDESRGANModel')).net_g  # inference: SRModel-like
        ours.load_state_dict(saved[key])
        ours.eval()
        with torch.no_grad():
            assert torch.equal(vanilla.net_g(lq), ours(lq)), model_type


# ----------------------------------------------------------------- bad options fail before iteration 1
@pytest.mark.parametrize('edit,match', [
    (lambda o: o.pop('network_d'), 'network_d'),
    (lambda o: o['train'].pop('optim_d'), 'train.optim_d'),
    (lambda o: o['train'].pop('gan_opt'), 'train.gan_opt'),
    (lambda o: o.update(kd=dict(teacher_layer=['body.1'], student_layers=['body.0'])), 'teacher_layer'),
    (lambda o: o['train'].update(kd_opt=dict(type='FitNetLos')), 'train.kd_opt.type'),
    (lambda o: o['train']['optim_d'].update(lr=-1), 'train.optim_d.lr'),
])
def test_bad_option_fails_before_iteration_1(tmp_path, monkeypatch, edit, match):
    from krdistill.models.gan_kd_model import KDSRGANModel
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(KDSRGANModel, 'optimize_parameters', lambda self, it: calls.append(it))
    opt = gan_opt(tmp_path, 'KDSRGANModel')
    edit(opt)
    with pytest.raises((KeyError, ValueError, TypeError, NotImplementedError)) as e:
        train_main(['-opt', str(write_yaml(opt, tmp_path / 'bad.yml'))], root_path=str(tmp_path))
    assert match in str(e.value)
    assert calls == []


def test_metakd_gan_meta_objective_has_no_gan_term(tmp_path):
    opt = gan_opt(tmp_path, 'MetaKDSRGANModel')
    model = build_model(opt)
    model.feed_data(_batch(opt))
    sr = model.net_g(model.lq)
    assert torch.equal(model.distiller.meta_criterion(sr, model.gt), model.cri_pix(sr, model.gt))
    assert 'l_g_gan' in model.distiller.pixel_terms(sr, model.gt)  # the virtual step's loss has it


# ----------------------------------------------------------------- non-finite policy
def test_nonfinite_discriminator_step_is_skipped(tmp_path):
    opt = gan_opt(tmp_path, 'KDSRGANModel')
    opt['train']['max_nonfinite'] = 5
    model = build_model(opt)
    model.feed_data(_batch(opt))
    d_before = {k: v.clone() for k, v in model.net_d.state_dict().items() if v.is_floating_point()}
    real = model.gt.clone()
    model.gt = real * float('nan')  # real images the discriminator cannot score; the generator step sees NaN too
    model.optimize_parameters(1)
    assert model._nonfinite == 1
    for k, v in model.net_d.state_dict().items():
        if k in d_before and not k.endswith(('weight_u', 'weight_v')):  # spectral-norm power iteration
            assert torch.equal(v, d_before[k]), k
    assert all(torch.isfinite(p).all() for p in model.net_g.parameters())
    model.gt = real
    model.optimize_parameters(2)
    assert model._nonfinite == 0


# ----------------------------------------------------------------- the Real-ESRGAN models
def test_real_esrgan_models_are_registered():
    from basicsr.utils.registry import MODEL_REGISTRY
    from basicsr.models.realesrgan_model import RealESRGANModel
    from basicsr.models.realesrnet_model import RealESRNetModel
    for name, base in (('KDRealESRGANModel', RealESRGANModel), ('MetaKDRealESRGANModel', RealESRGANModel),
                       ('KDRealESRNetModel', RealESRNetModel), ('MetaKDRealESRNetModel', RealESRNetModel)):
        assert issubclass(MODEL_REGISTRY.get(name), base)


REAL_DEGRADATION = dict(
    resize_prob=[0.2, 0.7, 0.1], resize_range=[0.15, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 30],
    poisson_scale_range=[0.05, 3], gray_noise_prob=0.4, jpeg_range=[30, 95], second_blur_prob=0.8,
    resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2], gaussian_noise_prob2=0.5, noise_range2=[1, 25],
    poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4, jpeg_range2=[30, 95], gt_size=32, queue_size=4,
    l1_gt_usm=True, percep_gt_usm=True, gan_gt_usm=False, gt_usm=True, high_order_degradation=True)


@pytest.mark.parametrize('model_type', ['KDRealESRGANModel', 'MetaKDRealESRNetModel'])
def test_real_esrgan_models_on_cpu_with_cuda_stubbed(tmp_path, monkeypatch, model_type):
    """BasicSR's Real-ESRGAN models call ``.cuda()`` (GPU only). Here, in the test alone, ``.cuda()``
    is made a no-op so the degradations, the teacher on the degraded input and both steps run on CPU."""
    monkeypatch.setattr(torch.nn.Module, 'cuda', lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)
    from basicsr.models import realesrgan_model, realesrnet_model
    from basicsr.utils.img_process_util import filter2D
    for module in (realesrgan_model, realesrnet_model):  # filter2D's .view refuses a non-contiguous CPU tensor
        monkeypatch.setattr(module, 'filter2D', lambda img, kernel: filter2D(img.contiguous(), kernel))
    if 'GAN' in model_type:
        opt = gan_opt(tmp_path, model_type)
    else:
        opt = tiny_metakd_opt(tmp_path)
        opt['model_type'] = model_type
    opt.update(copy.deepcopy(REAL_DEGRADATION))
    model = build_model(opt)
    seen = []
    orig = model.net_t.forward
    model.net_t.forward = lambda x: (seen.append(x.clone()), orig(x))[1]
    g = torch.Generator().manual_seed(0)
    k = torch.zeros(2, 7, 7)  # small kernels for small images (the data set gives 21 x 21)
    k[:, 3, 3] = 1
    batch = dict(gt=torch.rand(2, 3, 64, 64, generator=g), kernel1=k, kernel2=k.clone(), sinc_kernel=k.clone())
    for it in (1, 2):
        model.feed_data(batch)
        model.optimize_parameters(it)
    assert model.lq.shape[-1] == 16 and model.gt.shape[-1] == 32
    assert torch.equal(seen[-1], model.lq)  # the teacher saw the student's degraded input
    logs = model.get_current_log()
    assert ('l_g_gan' in logs and 'l_kd_out' in logs) if 'GAN' in model_type else 'l_texture' in logs


@pytest.mark.parametrize('model_type,missing', [('KDRealESRGANModel', 'jpeg_range2'), ('KDRealESRGANModel', 'gan_gt_usm'),
                                                ('MetaKDRealESRNetModel', 'gt_usm'),
                                                ('KDRealESRNetModel', 'resize_prob')])
def test_real_esrgan_degradation_keys_checked_before_iteration_1(tmp_path, monkeypatch, model_type, missing):
    monkeypatch.setattr(torch.nn.Module, 'cuda', lambda self, *a, **k: self)
    opt = gan_opt(tmp_path, model_type) if 'GAN' in model_type else tiny_opt(tmp_path, model_type=model_type)
    if model_type.startswith('Meta') and 'GAN' not in model_type:
        opt = tiny_metakd_opt(tmp_path)
        opt['model_type'] = model_type
    opt.update(copy.deepcopy(REAL_DEGRADATION))
    opt.pop(missing)
    with pytest.raises(KeyError, match=missing):
        build_model(opt)
