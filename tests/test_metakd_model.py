"""MetaKDModel: meta/joint/frozen gradient routing, teacher discipline, no leak of the virtual step,
model-agnostic construction, wrapped students, option errors."""
import copy

import pytest
import torch
from torch import nn

from helpers import cpu_data_parallel, save_teacher, tiny_metakd_opt
from basicsr.data import build_dataset
from basicsr.models import build_model
from krdistill.features import unwrap


def _batch(opt, idx=(0, 1)):
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    return torch.utils.data.default_collate([ds[i] for i in idx])


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_meta_step_updates_student_and_krnet_teacher_untouched(tmp_path, mode):
    opt = tiny_metakd_opt(tmp_path, meta=dict(mode=mode))
    model = build_model(opt)
    t0, s0, k0 = _snapshot(model.net_t), _snapshot(model.net_g), _snapshot(model.net_kr)
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    for k, v in model.net_t.state_dict().items():
        assert torch.equal(v, t0[k]), k
    assert all(p.grad is None for p in model.net_t.parameters())
    assert any(not torch.equal(v, s0[k]) for k, v in model.net_g.state_dict().items())
    assert any(not torch.equal(v, k0[k]) for k, v in model.net_kr.state_dict().items())
    logs = model.get_current_log()
    for key in ('l_pix', 'l_texture', 'l_meta', 't_meta'):
        assert key in logs, key
    assert logs['meta_grad_norm'] > 0


def test_virtual_step_does_not_leak_into_student(tmp_path, monkeypatch):
    """Between the meta step and the real step the student holds exactly its old parameters."""
    opt = tiny_metakd_opt(tmp_path)
    model = build_model(opt)
    model.feed_data(_batch(opt))
    before = _snapshot(model.net_g)
    seen = {}
    real_objective = model.distiller.loss

    def spy(*args, **kwargs):
        if kwargs.get('params') is None and len(args) < 4:  # the real student step (no params)
            seen['params'] = _snapshot(model.net_g)
        return real_objective(*args, **kwargs)
    monkeypatch.setattr(model.distiller, 'loss', spy)
    model.optimize_parameters(1)
    assert 'params' in seen
    for k, v in before.items():
        assert torch.equal(seen['params'][k], v), f'virtual step leaked into {k}'


def test_update_meta_krnet_gets_no_gradient_from_student_loss(tmp_path):
    opt = tiny_metakd_opt(tmp_path)
    model = build_model(opt)
    model.feed_data(_batch(opt))
    dist = model.distiller
    out_t, feats_t = dist.teacher_forward(model.lq)
    loss, terms, _ = dist.loss(model.lq, model.gt, (out_t, feats_t))
    assert terms['l_texture'] > 0
    dist.backward(loss)
    assert all(p.grad is None for p in dist.kr_parameters())
    assert all(p.grad is not None for p in model.net_g.parameters())
    # ... only through the meta objective
    dist.objective.meta_grad(model.lq, model.gt, model.lq, model.gt, (out_t, feats_t),
                             student_optimizer=model.optimizer_g)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dist.kr_parameters())


def test_update_joint_krnet_gets_gradient_from_student_loss(tmp_path):
    opt = tiny_metakd_opt(tmp_path, meta=dict(update='joint'))
    model = build_model(opt)
    model.feed_data(_batch(opt))
    dist = model.distiller
    loss, _, _ = dist.loss(model.lq, model.gt)
    dist.backward(loss)
    assert all(p.grad is not None for p in dist.kr_parameters())
    k0 = _snapshot(model.net_kr)
    model.optimize_parameters(1)
    assert 'l_meta' not in model.get_current_log()
    assert any(not torch.equal(v, k0[k]) for k, v in model.net_kr.state_dict().items())


def test_update_frozen_keeps_krnet(tmp_path):
    opt = tiny_metakd_opt(tmp_path, meta=dict(update='frozen'))
    model = build_model(opt)
    k0 = _snapshot(model.net_kr)
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    for k, v in model.net_kr.state_dict().items():
        assert torch.equal(v, k0[k]), k


def test_every_skips_meta_steps(tmp_path):
    opt = tiny_metakd_opt(tmp_path, meta=dict(every=4))
    model = build_model(opt)
    model.feed_data(_batch(opt))
    k0 = _snapshot(model.net_kr)
    for it in (1, 2, 3):
        model.optimize_parameters(it)
        assert 'l_meta' not in model.get_current_log()
    for k, v in model.net_kr.state_dict().items():
        assert torch.equal(v, k0[k]), k
    model.optimize_parameters(4)
    assert 'l_meta' in model.get_current_log()


def test_wrapped_student_uses_bare_model(tmp_path):
    """A DataParallel/DDP-style wrapper around the student: hooks and functional_call use the bare model."""
    opt = tiny_metakd_opt(tmp_path)
    model = build_model(opt)
    model.feed_data(_batch(opt))
    bare = model.net_g
    model.net_g = cpu_data_parallel(bare)  # what BaseModel.model_to_device does with several GPUs
    model.distiller.student = model.net_g
    s0 = _snapshot(bare)
    model.optimize_parameters(1)
    assert unwrap(model.net_g) is bare
    assert any(not torch.equal(v, s0[k]) for k, v in bare.state_dict().items())
    assert model.get_current_log()['meta_grad_norm'] > 0


def test_meta_dataset_is_used(tmp_path):
    opt = tiny_metakd_opt(tmp_path)
    opt['meta']['dataset'] = dict(copy.deepcopy(opt['datasets']['train']), name='meta')
    model = build_model(opt)
    assert model.distiller._meta_iter is not None
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    assert 'l_meta' in model.get_current_log()


@pytest.mark.parametrize('bad,key', [
    (dict(meta=dict(mode='second_order')), 'meta.mode'),
    (dict(meta=dict(update='both')), 'meta.update'),
    (dict(meta=dict(every=0)), 'meta.every'),
    (dict(meta=dict(fd_eps='fast')), 'meta.fd_eps'),
    (dict(meta=dict(inner_lr=0.01)), 'meta.inner_lr: removed'),
    (dict(meta=dict(adapters='joint')), 'meta.adapters: removed'),
    (dict(meta=dict(teacher_weight=1.0)), 'meta.teacher_weight: removed'),
    (dict(network_kr=dict(type='KRNet', gain=True)), 'network_kr.gain: removed'),
    (dict(meta=dict(evry=2)), 'evry'),
    (dict(network_kr=dict(type='KRNet', s_channels=8)), 'network_kr.s_channels'),
    (dict(network_kr=dict(type='KRNett')), 'network_kr.type'),
    (dict(network_kr=dict(type='KRNet', num_kernel=4)), 'network_kr'),
])
def test_option_errors_name_the_key(tmp_path, bad, key):
    opt = tiny_metakd_opt(tmp_path)
    for block, value in bad.items():
        if block == 'meta':
            opt['meta'] = dict(opt['meta'], **value)
        else:
            opt[block] = value
    with pytest.raises((KeyError, ValueError, TypeError)) as e:
        build_model(opt)
    assert key in str(e.value)


TINY_SWINIR = dict(type='SwinIR', upscale=2, in_chans=3, img_size=16, window_size=4, img_range=1., depths=[2, 2],
                   embed_dim=12, num_heads=[2, 2], mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv')
PAIRS = {
    'EDSR->EDSR': (dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2),
                   dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, upscale=2),
                   ['body.1'], ['body.0']),
    'RCAN->RCAN': (dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=16, num_group=2, num_block=2,
                        squeeze_factor=4, upscale=2),
                   dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=8, num_group=1, num_block=1,
                        squeeze_factor=4, upscale=2), ['body.1'], ['body.0']),
    'RRDBNet->MSRResNet': (dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, scale=2, num_feat=16, num_block=2,
                                num_grow_ch=8),
                           dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2),
                           ['body.1', 'conv_body'], ['body.0', 'body.1']),
    'SwinIR->EDSR': (TINY_SWINIR,
                     dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2),
                     ['layers.0', 'layers.1'], ['body.0', 'body.1']),
    'EDSR->SwinIR': (dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2),
                     dict(TINY_SWINIR, depths=[2], num_heads=[2]), ['body.1'], ['layers.0']),
}


@pytest.mark.parametrize('pair', PAIRS)
def test_model_agnostic(tmp_path, pair):
    t_opt, s_opt, t_layers, s_layers = PAIRS[pair]
    teacher = save_teacher(tmp_path / 'teacher_pair.pth', t_opt)
    opt = tiny_metakd_opt(tmp_path)
    opt.update(network_t=t_opt, network_g=s_opt, kd=dict(teacher_layers=t_layers, student_layers=s_layers))
    opt['path']['pretrain_network_t'] = str(teacher)
    model = build_model(opt)
    t0, s0 = _snapshot(model.net_t), _snapshot(model.net_g)
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    assert len(model.net_kr) == len(s_layers)
    for k, v in model.net_t.state_dict().items():
        assert torch.equal(v, t0[k]), k
    assert any(not torch.equal(v, s0[k]) for k, v in model.net_g.state_dict().items())
    assert model.get_current_log()['meta_grad_norm'] > 0
