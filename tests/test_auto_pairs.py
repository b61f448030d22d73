"""``kd: auto``: distillation points paired by relative depth along the bodies, for every arch pair
the tests use; explicit names still work; no body or no compatible size is a clear error."""
import copy
import itertools
import os

import pytest
import torch
from torch import nn

from basicsr.archs import build_network
from basicsr.models import build_model
from helpers import save_teacher, tiny_metakd_opt, tiny_opt
from krdistill.pairing import auto_pairs, body_points
from test_metakd_model import TINY_SWINIR, _batch

ARCHS = {
    'EDSR': dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=3, upscale=2),
    'RCAN': dict(type='RCAN', num_in_ch=3, num_out_ch=3, num_feat=16, num_group=2, num_block=2, squeeze_factor=4,
                 upscale=2),
    'RRDBNet': dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, scale=2, num_feat=16, num_block=2, num_grow_ch=8),
    'SwinIR': TINY_SWINIR,
    'MSRResNet': dict(type='MSRResNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2),
    'ECBSR': dict(type='ECBSR', num_in_ch=3, num_out_ch=3, num_block=2, num_channel=8, with_idt=False,
                  act_type='prelu', scale=2),
    'SRVGGNetCompact': dict(type='SRVGGNetCompact', num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=4, upscale=2,
                            act_type='prelu'),
}
BODY = {'EDSR': ['body.0', 'body.1', 'body.2'], 'RCAN': ['body.0', 'body.1'], 'RRDBNet': ['body.0', 'body.1'],
        'SwinIR': ['layers.0', 'layers.1'], 'MSRResNet': ['body.0', 'body.1'],
        'ECBSR': ['backbone.0', 'backbone.1', 'backbone.2'],
        'SRVGGNetCompact': ['body.0', 'body.2', 'body.4', 'body.6', 'body.8']}


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_body_is_the_repeated_blocks(arch):
    net = build_network(copy.deepcopy(ARCHS[arch]))
    assert [n for n, _ in body_points(net, torch.rand(1, 3, 16, 16))] == BODY[arch]


@pytest.mark.parametrize('teacher,student', [(t, s) for t, s in itertools.product(sorted(ARCHS), repeat=2)])
def test_every_pair_gets_points_at_the_end_of_equal_segments(teacher, student):
    t, s = build_network(copy.deepcopy(ARCHS[teacher])), build_network(copy.deepcopy(ARCHS[student]))
    pairs = auto_pairs(t, s, 2)
    assert [p[0] for p in pairs] == [BODY[teacher][round(k * len(BODY[teacher]) / 2) - 1] for k in (1, 2)]
    assert [p[1] for p in pairs] == [BODY[student][round(k * len(BODY[student]) / 2) - 1] for k in (1, 2)]
    assert auto_pairs(t, s, 1)[0][:2] == (BODY[teacher][-1], BODY[student][-1])


@pytest.mark.parametrize('teacher,student', [('RCAN', 'EDSR'), ('SwinIR', 'SRVGGNetCompact'), ('RRDBNet', 'MSRResNet'),
                                             ('EDSR', 'ECBSR')])
def test_kd_auto_trains_and_logs_the_pairs(tmp_path, teacher, student, caplog):
    save_teacher(tmp_path / 't.pth', ARCHS[teacher])
    opt = tiny_metakd_opt(tmp_path)
    opt.update(network_t=copy.deepcopy(ARCHS[teacher]), network_g=copy.deepcopy(ARCHS[student]),
               kd=dict(auto=True, points=2))
    opt['path']['pretrain_network_t'] = str(tmp_path / 't.pth')
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)
    import logging
    logging.getLogger('basicsr').propagate = True
    with caplog.at_level(logging.INFO, logger='basicsr'):
        model = build_model(opt)
    assert model.kd_opt['teacher_layers'][-1] == BODY[teacher][-1]
    assert len(model.net_kr) == 2
    assert 'kd: auto chose 2 distillation point(s)' in caplog.text and BODY[student][-1] in caplog.text
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    assert model.get_current_log()['meta_grad_norm'] > 0


def test_kd_auto_string_and_explicit_names(tmp_path):
    opt = tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'))
    opt['kd'] = 'auto'
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)
    model = build_model(opt)
    assert model.kd_opt == dict(teacher_layers=['body.1'], student_layers=['body.0'])
    opt['kd'] = dict(auto=True, teacher_layers=['body.0'])
    with pytest.raises(KeyError, match='either kd.auto or kd.teacher_layers'):
        build_model(opt)
    opt['kd'] = dict(auto=True, points=0)
    with pytest.raises(ValueError, match=r'kd\.points'):
        build_model(opt)


class _NoBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.up = nn.PixelShuffle(2)

    def forward(self, x):
        return self.up(self.conv(x))


class _Strided(nn.Module):
    """A body whose maps are 6 x 6 on a 16 x 16 input: no integer factor of the student's 16 x 16."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
        self.out = nn.Conv2d(8, 3 * 4 * 9, 1)

    def forward(self, x):
        y = self.body(self.down(x))
        return nn.functional.interpolate(self.out(y)[:, :3], size=(32, 32))


def test_no_body_or_no_compatible_pair_is_a_clear_error():
    edsr = build_network(copy.deepcopy(ARCHS['EDSR']))
    with pytest.raises(ValueError, match='found no body of repeated blocks in network_t'):
        auto_pairs(_NoBody(), edsr)
    with pytest.raises(ValueError, match='no compatible pair'):
        auto_pairs(_Strided(), edsr)
    with pytest.raises(ValueError, match=r'kd\.points: 9 points asked'):
        auto_pairs(edsr, edsr, 9)
