"""Shapes are checked before iteration 1 for every model and pair (issue 28, principle 3): scale and
output channels, in one dummy forward of teacher and student, also for an output-KD-only run; the
errors name the YAML keys to fix."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import TINY_T, save_teacher, tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.build import build_distiller, probe_pairs
from krdistill.train import main as train_main


def _teacher(opt: dict, root: Path, **changes) -> None:
    t_opt = dict(TINY_T, **changes)
    opt['network_t'] = t_opt
    name = '_'.join(f'{k}{v}' for k, v in changes.items())
    opt['path']['pretrain_network_t'] = str(save_teacher(root / f'teacher_{name}.pth', t_opt))


#: edit of an output-KD-only run -> (error type, words the message must start with / hold)
CASES = {
    'student of another scale': (lambda o, r: o['network_g'].update(upscale=3), ValueError,
                                 ['scale mismatch', 'network_g.upscale']),
    'both of another scale than scale': (lambda o, r: (o['network_g'].update(upscale=3), _teacher(o, r, upscale=3)),
                                         ValueError, ['scale mismatch', 'option scale is x2', 'network_g.upscale']),
    'student with 1 output channel': (lambda o, r: o['network_g'].update(num_out_ch=1), ValueError,
                                      ['network_g.num_out_ch: 1, but the training images have 3 channel(s)']),
    'teacher with 1 output channel': (lambda o, r: _teacher(o, r, num_out_ch=1), ValueError,
                                      ['network_t.num_out_ch: 1, but the training images have 3 channel(s)']),
    'student with 1 input channel': (lambda o, r: o['network_g'].update(num_in_ch=1), ValueError,
                                     ['network_g.num_in_ch: 1']),
    '1-channel data, 3-channel networks': (lambda o, r: o['datasets']['train'].update(color='y'), ValueError,
                                           ['network_g.num_in_ch: 3, but the training images have 1 channel(s)',
                                            'datasets.train.color: y']),
}


@pytest.mark.parametrize('case', CASES)
def test_output_kd_only_run_is_refused_before_iteration_1(tmp_path, case):
    edit, error, words = CASES[case]
    opt = tiny_opt(tmp_path, total_iter=2, output_kd_opt=dict(type='OutputKDLoss'))
    opt['kd'] = dict(teacher_layers=[], student_layers=[])  # no distillation point: output KD only
    edit(opt, tmp_path)
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'bad.yml')
    with pytest.raises(error) as e:
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(words[0]), msg
    for w in words[1:]:
        assert w in msg, (w, msg)
    exp = tmp_path / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth'))
    assert 'l1_loss' not in msg


def test_metakd_student_of_another_scale_is_refused(tmp_path):
    from basicsr.models import build_model
    opt = tiny_metakd_opt(tmp_path)
    opt['network_g']['upscale'] = 3
    with pytest.raises(ValueError, match=r'^scale mismatch.*network_g\.upscale'):
        build_model(opt)


def test_one_channel_runs_pass_when_networks_and_data_agree(tmp_path):
    """``datasets.train.color: y`` with 1-channel networks is accepted, and the dummy forward saw
    1-channel images."""
    from basicsr.models import build_model
    vgg = dict(type='SRVGGNetCompact', num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2,
               act_type='prelu')
    opt = tiny_opt(tmp_path)
    opt['datasets']['train']['color'] = 'y'
    opt['network_g'] = dict(vgg)
    opt['network_t'] = dict(vgg, num_feat=16)
    opt['path']['pretrain_network_t'] = str(save_teacher(tmp_path / 'vgg1.pth', opt['network_t']))
    model = build_model(opt)
    assert model.kd_shapes['channels'] == 1 and model.kd_shapes['scale'] == 2


def test_a_broadcasting_arch_needs_the_option_check(tmp_path):
    """EDSR with ``num_out_ch: 1`` gives 3-channel images (its 3-value mean broadcasts): the dummy
    forward alone would pass it, so ``num_out_ch`` is checked against the data as well."""
    from basicsr.archs import build_network
    net = build_network(dict(TINY_T, num_out_ch=1))
    assert net(torch.rand(1, 3, 8, 8)).shape[1] == 3
    from basicsr.models import build_model
    opt = tiny_opt(tmp_path)
    opt['network_g']['num_out_ch'] = 1
    with pytest.raises(ValueError, match=r'^network_g\.num_out_ch: 1, but the training images have 3'):
        build_model(opt)


# ------------------------------------------------------------------ the framework-free builder (plain loops)
class _Up(nn.Module):
    def __init__(self, scale: int, out_ch: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, out_ch * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.shuffle(self.conv(x))


def test_build_distiller_checks_an_output_kd_pair():
    with pytest.raises(ValueError, match=r'^scale mismatch'):
        build_distiller(_Up(2), _Up(3), output_kd_opt={'type': 'OutputKDLoss'})
    with pytest.raises(ValueError, match=r'^channel mismatch.*teacher\.num_out_ch / student\.num_out_ch'):
        build_distiller(_Up(2, out_ch=3), _Up(2, out_ch=1), output_kd_opt={'type': 'OutputKDLoss'})
    build_distiller(_Up(2), _Up(2), output_kd_opt={'type': 'OutputKDLoss'})  # a good pair passes


def test_a_failing_dummy_forward_names_the_network_key():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 3, 3)

        def forward(self, x):
            return self.conv(x)

    keys = dict(teacher='network_t', student='network_g')
    with pytest.raises(RuntimeError, match=r'^network_g: one dummy forward on a \(1, 3, 16, 16\) LR input failed'):
        probe_pairs(_Up(2), Broken(), [], [], torch.rand(1, 3, 16, 16), keys)
