"""Values that trained something else, or failed late, when tried as a new user would (issue 28,
second round): each is refused by ``krdistill-train`` before iteration 1, naming the YAML key."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.train import main as train_main


def _total_iter(v):
    def edit(opt):
        opt['train']['total_iter'] = v
    return edit


def _gt_size(v):
    def edit(opt):
        opt['datasets']['train']['gt_size'] = v
    return edit


def _optim_kd(opt):
    opt['train']['optim_kd'] = {'lr': 1.0e-2}  # output KD only: no regressor to apply it to


def _meta_start(opt):
    opt['meta']['start'] = 100  # > total_iter


#: case: (model, edit, exception, the message's start)
CASES = {
    'total_iter_negative': ('kd', _total_iter(-3), ValueError, 'train.total_iter: must be a whole number'),
    'total_iter_zero': ('kd', _total_iter(0), ValueError, 'train.total_iter: must be a whole number'),
    'total_iter_fraction': ('kd', _total_iter(4.5), ValueError, 'train.total_iter: must be a whole number'),
    'total_iter_string': ('kd', _total_iter('4k'), ValueError, 'train.total_iter: must be a whole number'),
    'gt_size_not_multiple_of_scale': ('kd', _gt_size(15), ValueError,
                                      'datasets.train.gt_size: 15 is not a multiple of the scale (2)'),
    'gt_size_larger_than_images': ('kd', _gt_size(64), ValueError, 'datasets.train.gt_size: 64, but GT '),
    'optim_kd_without_regressors': ('kd', _optim_kd, ValueError, 'train.optim_kd: sets the optimizer of the KD'),
    'meta_start_after_the_run': ('metakd', _meta_start, ValueError, 'meta.start: 100, but train.total_iter is 4'),
}


def _opt(tmp_path, model):
    return tiny_opt(tmp_path) if model == 'kd' else tiny_metakd_opt(tmp_path)


@pytest.mark.parametrize('case', CASES)
def test_refused_before_iteration_1_naming_the_key(tmp_path, case):
    model, edit, exc, start = CASES[case]
    opt = _opt(tmp_path, model)
    edit(opt)
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'bad.yml')
    with pytest.raises(exc) as e:
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    assert str(e.value).startswith(start), str(e.value)
    exp = tmp_path / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth'))


def test_whole_float_total_iter_and_frozen_late_start_pass(tmp_path):
    """What BasicSR accepts stays accepted: ``total_iter: 2.0`` (it calls int()), and a late
    ``meta.start`` with ``meta.update: frozen`` (the control, said explicitly)."""
    opt = tiny_metakd_opt(tmp_path, meta=dict(start=100, update='frozen'))
    opt['train']['total_iter'] = 2.0
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'ok.yml')
    train_main(['-opt', str(yml)], root_path=str(tmp_path))
    assert list((tmp_path / 'experiments' / opt['name']).glob('train_*.log'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='the check is for machines without CUDA')
def test_num_gpu_without_cuda_names_the_key(tmp_path):
    opt = tiny_opt(tmp_path)
    opt['num_gpu'] = 1
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'bad.yml')
    with pytest.raises(RuntimeError, match=r'^num_gpu: 1, but torch finds no CUDA device'):
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
