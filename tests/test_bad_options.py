"""Broken option files fail before the first iteration, with a message naming the key to fix."""
import copy

import pytest

from helpers import TINY_T, save_teacher, tiny_metakd_opt, write_pairs, write_yaml
from krdistill.train import main as train_main


def _scale3_teacher(opt, root):
    t_opt = dict(TINY_T, upscale=3)
    opt['network_t'] = t_opt
    opt['path']['pretrain_network_t'] = str(save_teacher(root / 'teacher_x3.pth', t_opt))


def _empty_dataset(opt, root):
    (root / 'empty').mkdir()
    opt['datasets']['train']['dataroot_gt'] = str(root / 'empty')


def _corrupt_dataset(opt, root):
    hr, lr = write_pairs(root / 'corrupt', n=2, size=32, scale=2)
    (hr / 'img001.png').write_bytes((hr / 'img001.png').read_bytes()[:60])  # truncated file
    opt['datasets']['train'].update(dataroot_gt=str(hr), dataroot_lq=str(lr))


def _unpaired_dataset(opt, root):
    hr, lr = write_pairs(root / 'unpaired', n=2, size=32, scale=2)
    (lr / 'img001.png').rename(lr / 'other.png')
    opt['datasets']['train'].update(dataroot_gt=str(hr), dataroot_lq=str(lr))


CASES = {
    'unknown kd key': (lambda o, r: o['kd'].update(teacher_layer=['body.1']), 'teacher_layer'),
    'unknown meta key': (lambda o, r: o['meta'].update(evry=4), 'evry'),
    'kd layers not a list': (lambda o, r: o['kd'].update(student_layers=5), 'kd.student_layers'),
    'meta.every wrong type': (lambda o, r: o['meta'].update(every='4'), 'meta.every'),
    'meta.mode wrong value': (lambda o, r: o['meta'].update(mode='second'), 'meta.mode'),
    'meta not a mapping': (lambda o, r: o.update(meta=[1]), 'meta'),
    'missing teacher path': (lambda o, r: o['path'].pop('pretrain_network_t'), 'path.pretrain_network_t'),
    'teacher file absent': (lambda o, r: o['path'].update(pretrain_network_t=str(r / 'no.pth')),
                            'path.pretrain_network_t'),
    'mismatched scales': (_scale3_teacher, 'network_t.upscale'),
    'layer pairs of different length': (lambda o, r: o['kd'].update(teacher_layers=['body.0', 'body.1']),
                                        'kd.teacher_layers'),
    'unknown module': (lambda o, r: o['kd'].update(teacher_layers=['body.5']), 'kd.teacher_layers'),
    'empty dataset': (_empty_dataset, 'datasets.train.dataroot_gt'),
    'missing dataset folder': (lambda o, r: o['datasets']['train'].update(dataroot_lq=str(r / 'nope')),
                               'datasets.train.dataroot_lq'),
    'corrupt image': (_corrupt_dataset, 'img001.png'),
    'unpaired folders': (_unpaired_dataset, 'datasets.train'),
    'datasets.meta moved to meta.dataset': (lambda o, r: o['datasets'].update(meta=dict(o['datasets']['train'],
                                                                                      name='meta')), 'meta.dataset'),
    'unknown texture loss': (lambda o, r: o['train'].update(texture_opt=dict(type='TextureLoss')),
                             'train.texture_opt.type'),
}


@pytest.mark.parametrize('case', CASES)
def test_broken_option_fails_before_first_iteration(tmp_path, case):
    mutate, key = CASES[case]
    opt = tiny_metakd_opt(tmp_path, total_iter=2)
    mutate(opt, tmp_path)
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'bad.yml')
    with pytest.raises((KeyError, ValueError, TypeError, FileNotFoundError, RuntimeError)) as e:
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    assert key in str(e.value), f'{case}: {e.value}'
    exp = tmp_path / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth')), 'failed after training started'
