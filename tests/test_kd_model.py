"""KDSRModel: gradient audit, teacher discipline and clear errors that name the YAML key."""
import copy

import pytest
import torch

from helpers import TINY_T, save_teacher, tiny_opt, write_pairs
from basicsr.data import build_dataset
from basicsr.models import build_model


def _batch(opt):
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    return torch.utils.data.default_collate([ds[0], ds[1]])


@pytest.mark.parametrize('kd_opt', [
    dict(type='FitNetLoss', loss_weight=0.1),
    dict(type='ATLoss', loss_weight=10.0),
    dict(type='FAKDLoss', loss_weight=1.0),
    None,
])
def test_gradient_audit(tmp_path, kd_opt):
    extra = dict(output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0))
    if kd_opt:
        extra['kd_opt'] = kd_opt
    opt = tiny_opt(tmp_path, **extra)
    model = build_model(opt)
    teacher_before = {k: v.clone() for k, v in model.net_t.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)

    assert not model.net_t.training
    for name, p in model.net_t.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    for k, v in model.net_t.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f'teacher changed: {k}'
    for name, p in model.net_g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'student param without grad: {name}'
    assert any(not torch.equal(v, student_before[k]) for k, v in model.net_g.state_dict().items())
    if kd_opt and kd_opt['type'] == 'FitNetLoss':
        for name, p in model.distiller.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f'regressor param without grad: {name}'
    logs = model.get_current_log()
    assert 'l_pix' in logs and 'l_kd_out' in logs
    if kd_opt:
        tag = {'FitNetLoss': 'fitnet', 'ATLoss': 'at', 'FAKDLoss': 'fakd'}[kd_opt['type']]
        assert f'l_kd_{tag}' in logs


def test_teacher_is_not_saved_and_not_wrapped(tmp_path):
    opt = tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'))
    model = build_model(opt)
    assert type(model.net_t).__name__ == 'EDSR'
    assert not any(k.startswith('teacher') for k in model.distiller.state_dict())
    assert all(k.startswith('pair_losses') for k in model.distiller.state_dict())


def test_inference_builds_no_teacher(tmp_path):
    opt = tiny_opt(tmp_path)
    opt['is_train'] = False
    model = build_model(opt)
    assert not hasattr(model, 'net_t')


def _error(tmp_path, mutate, exc=Exception):
    opt = tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'))
    mutate(opt)
    with pytest.raises(exc) as e:
        build_model(opt)
    return str(e.value)


def test_unknown_module_name(tmp_path):
    msg = _error(tmp_path, lambda o: o['kd'].update(student_layers=['body.7']), KeyError)
    assert 'kd.student_layers' in msg and 'body.0' in msg


def test_teacher_checkpoint_missing(tmp_path):
    msg = _error(tmp_path, lambda o: o['path'].update(pretrain_network_t=str(tmp_path / 'nope.pth')),
                 FileNotFoundError)
    assert 'path.pretrain_network_t' in msg
    msg = _error(tmp_path, lambda o: o['path'].pop('pretrain_network_t'), ValueError)
    assert 'path.pretrain_network_t' in msg


def test_wrong_param_key(tmp_path):
    msg = _error(tmp_path, lambda o: o['path'].update(param_key_t='params_ema'), KeyError)
    assert 'path.param_key_t' in msg and "'params'" in msg


def test_teacher_arch_mismatch(tmp_path):
    msg = _error(tmp_path, lambda o: o['network_t'].update(num_feat=12), RuntimeError)
    assert 'network_t' in msg and 'strict_load_t' in msg


def test_scale_mismatch(tmp_path):
    def mutate(o):
        t_opt = dict(TINY_T, upscale=3)
        save_teacher(tmp_path / 'teacher_x3.pth', t_opt)
        o['network_t'] = t_opt
        o['path']['pretrain_network_t'] = str(tmp_path / 'teacher_x3.pth')
    msg = _error(tmp_path, mutate, ValueError)
    assert 'scale' in msg and 'network_t' in msg


def test_layer_lists_of_different_length(tmp_path):
    msg = _error(tmp_path, lambda o: o['kd'].update(teacher_layers=['body.0', 'body.1']), ValueError)
    assert 'kd.teacher_layers' in msg and 'kd.student_layers' in msg


def test_unknown_kd_key(tmp_path):
    msg = _error(tmp_path, lambda o: o['kd'].update(student_layer=['body.0']), KeyError)
    assert 'student_layer' in msg


def test_unknown_loss_type(tmp_path):
    msg = _error(tmp_path, lambda o: o['train'].update(kd_opt=dict(type='FitNetLos')), KeyError)
    assert 'train.kd_opt.type' in msg


def test_corrupt_image_names_file_and_key(tmp_path):
    opt = tiny_opt(tmp_path)
    hr_dir, lr_dir = write_pairs(tmp_path / 'bad', n=2, size=32, scale=2)
    (hr_dir / 'img000.png').write_bytes(b'not a png at all')
    ds_opt = dict(opt['datasets']['train'], dataroot_gt=str(hr_dir), dataroot_lq=str(lr_dir),
                  check_images=False)
    with pytest.raises((RuntimeError, ValueError)) as e:  # at the preflight (header) or at the read
        build_dataset(ds_opt)[0]
    msg = str(e.value)
    assert 'img000.png' in msg and 'datasets.train' in msg and 'dataroot_gt' in msg
