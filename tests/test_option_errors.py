"""Option errors name the YAML key; a non-strict teacher load reports and refuses a poor match;
registry lookups use BasicSR's own name resolution."""
import copy
import os

import pytest
import torch

from basicsr.models import build_model
from helpers import TINY_T, save_teacher, tiny_metakd_opt, tiny_opt
from krdistill.io import load_weights


def _prepare(opt):
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)


@pytest.mark.parametrize('edit,match', [
    (lambda o: o['train'].update(optim_kr=dict(type='Adam', lr=-1e-3)), r'train\.optim_kr\.lr'),
    (lambda o: o['meta'].update(fd_eps='1e-4'), r'meta\.fd_eps.*1\.0e-4'),
    (lambda o: o['meta'].update(every=0), r'meta\.every'),
    (lambda o: o['meta'].update(fd_eps='0.01x'), r'meta\.fd_eps'),
    (lambda o: o['train'].update(max_nonfinite=0), r'train\.max_nonfinite'),
    (lambda o: o['train'].update(max_nonfinite='10'), r'train\.max_nonfinite'),
    (lambda o: o['train']['optim_g'].update(lr='2e-4'), r'train\.optim_g\.lr.*1\.0e-4'),
    (lambda o: o['train']['optim_g'].update(betas=[0.9, 1.5]), r'train\.optim_g\.betas\[1\]'),
    (lambda o: o['train']['texture_opt'].update(loss_weight=-1), r'train\.texture_opt\.loss_weight'),
    (lambda o: o['train'].update(output_kd_opt=dict(type='OutputKDLoss', loss_weight='1e-1')),
     r'train\.output_kd_opt\.loss_weight'),
    (lambda o: o['network_kr'].update(type='NoSuchKRNet'), r'network_kr\.type'),
    (lambda o: o['network_t'].update(type='NoSuchArch'), r'network_t\.type'),
    (lambda o: o['meta'].update(dataset='folder'), r'meta\.dataset'),
    (lambda o: o['datasets'].update(meta=dict(o['datasets']['train'])), r'meta\.dataset'),
])
def test_numeric_and_type_options_name_the_key(tmp_path, edit, match):
    opt = tiny_metakd_opt(tmp_path)
    _prepare(opt)
    edit(opt)
    with pytest.raises((ValueError, KeyError, TypeError, NotImplementedError), match=match):
        build_model(opt)


def test_srvggnetcompact_teacher_is_resolved_as_basicsr_does(tmp_path):
    net_t = dict(type='SRVGGNetCompact', num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2,
                 act_type='prelu')
    save_teacher(tmp_path / 'vgg.pth', net_t)
    opt = tiny_opt(tmp_path, output_kd_opt=dict(type='OutputKDLoss'))
    opt['network_t'] = net_t
    opt['path']['pretrain_network_t'] = str(tmp_path / 'vgg.pth')
    opt['kd'] = dict(teacher_layers=[], student_layers=[])
    _prepare(opt)
    model = build_model(opt)
    assert type(model.net_t).__name__ == 'SRVGGNetCompact'


def test_non_strict_teacher_load_refuses_a_mismatched_checkpoint(tmp_path):
    rcan = dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=16, num_group=1, num_block=1, squeeze_factor=4,
                upscale=2, res_scale=1, img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])
    save_teacher(tmp_path / 'rcan.pth', rcan)
    opt = tiny_opt(tmp_path)
    opt['path'].update(pretrain_network_t=str(tmp_path / 'rcan.pth'), strict_load_t=False)
    _prepare(opt)
    with pytest.raises(RuntimeError, match=r'path\.strict_load_t is false.*matches only'):
        build_model(opt)
    opt['path']['strict_load_t'] = True
    with pytest.raises(RuntimeError, match=r'path\.pretrain_network_t.*does not match.*path\.strict_load_t'):
        build_model(opt)


def test_non_strict_load_reports_missing_and_unexpected_keys(tmp_path):
    from basicsr.archs import build_network
    save_teacher(tmp_path / 't.pth')
    ckpt = torch.load(tmp_path / 't.pth', weights_only=True)
    ckpt['params']['extra.weight'] = torch.zeros(1)
    del ckpt['params']['conv_last.bias']
    torch.save(ckpt, tmp_path / 't2.pth')
    net = build_network(copy.deepcopy(TINY_T))
    lines = []
    report = load_weights(net, tmp_path / 't2.pth', 'params', strict=False, log=lines.append)
    assert report['missing'] == ['conv_last.bias'] and report['unexpected'] == ['extra.weight']
    assert lines and 'conv_last.bias' in lines[0] and 'extra.weight' in lines[0]
    assert torch.equal(net.state_dict()['conv_first.weight'], ckpt['params']['conv_first.weight'])


def test_teacher_checkpoint_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}', ))

    torch.save({'params': Payload()}, tmp_path / 'evil.pth')
    opt = tiny_opt(tmp_path)
    opt['path']['pretrain_network_t'] = str(tmp_path / 'evil.pth')
    _prepare(opt)
    with pytest.raises(RuntimeError, match=r'path\.pretrain_network_t.*weights_only=True'):
        build_model(opt)
    assert not (tmp_path / 'pwned').exists()
