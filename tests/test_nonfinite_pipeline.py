"""Non-finite values through the real training pipeline (krdistill-train): training stops after
``train.max_nonfinite`` skipped iterations whatever term caused them, no file written holds a
non-finite tensor, and ``--auto_resume`` continues from the last good state."""
import glob
import os

import pytest
import torch

from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY
from helpers import tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.data.checked_dataset import CheckedPairedImageDataset
from krdistill.train import main as train_main

_POISON = {'from_call': None, 'calls': 0}


class NaNFromCallDataset(CheckedPairedImageDataset):
    """Test-only: from the ``_POISON['from_call']``-th sample on, the GT holds a NaN."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        _POISON['calls'] += 1
        start = _POISON['from_call']
        if start is not None and _POISON['calls'] >= start:
            item['gt'] = item['gt'].clone()
            item['gt'][0, 0, 0] = float('nan')
        return item


if 'NaNFromCallDataset' not in DATASET_REGISTRY:
    DATASET_REGISTRY.register(NaNFromCallDataset)


def _all_finite_files(exp):
    files = glob.glob(os.path.join(exp, 'models', '*.pth')) + glob.glob(os.path.join(exp, 'training_states', '*'))
    assert files
    for f in files:
        obj = torch.load(f, map_location='cpu', weights_only=True)
        stack = [obj]
        while stack:
            x = stack.pop()
            if torch.is_tensor(x):
                assert not x.is_floating_point() or bool(torch.isfinite(x).all()), f
            elif isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
    return files


def _opt(tmp_path, model):
    make = {'KDSRModel': lambda: tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'), total_iter=14, max_nonfinite=3),
            'MetaKDModel': lambda: tiny_metakd_opt(tmp_path, total_iter=14, max_nonfinite=3)}[model]
    opt = make()
    opt['datasets']['train']['type'] = 'NaNFromCallDataset'
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2)
    opt['val']['val_freq'] = 100
    return opt


@pytest.mark.parametrize('model', ['KDSRModel', 'MetaKDModel'])
def test_nan_from_iteration_k_stops_saves_good_state_and_resumes(tmp_path, model):
    opt = _opt(tmp_path, model)
    yml = write_yaml(opt, tmp_path / 'nan.yml')
    _POISON.update(from_call=2 * 4 + 1, calls=0)  # batch size 2: iteration 5 is the first bad one
    with pytest.raises(FloatingPointError, match='max_nonfinite=3|3 iterations in a row') as e:
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    assert 'iter 7' in str(e.value)
    exp = os.path.join(tmp_path, 'experiments', opt['name'])
    _all_finite_files(exp)
    assert os.path.isfile(os.path.join(exp, 'training_states', '7.state'))  # the stop checkpoint: last good state
    log = ''.join(open(f).read() for f in glob.glob(os.path.join(exp, 'train_*.log')))
    assert log.count('step skipped') == 3
    # the data is fixed; --auto_resume continues from the stop checkpoint to the end
    _POISON.update(from_call=None)
    train_main(['-opt', str(yml), '--auto_resume'], root_path=str(tmp_path))
    assert os.path.isfile(os.path.join(exp, 'models', 'net_g_14.pth'))
    log = ''.join(open(f).read() for f in glob.glob(os.path.join(exp, 'train_*.log')))
    assert 'Resuming training from epoch' in log and 'iter: 7' in log
    _all_finite_files(exp)


def test_nan_krnet_weights_are_never_saved_and_resume_continues(tmp_path, monkeypatch):
    opt = _opt(tmp_path, 'MetaKDModel')
    yml = write_yaml(opt, tmp_path / 'nan_kr.yml')
    _POISON.update(from_call=None, calls=0)
    cls = MODEL_REGISTRY.get('MetaKDModel')
    orig = cls.run_iteration

    def poisoned(self, current_iter):
        if current_iter == 5:
            with torch.no_grad():
                next(self.net_kr.parameters()).view(-1)[0] = float('nan')
        return orig(self, current_iter)

    monkeypatch.setattr(cls, 'run_iteration', poisoned)
    with pytest.raises(FloatingPointError, match='non-finite'):
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    exp = os.path.join(tmp_path, 'experiments', opt['name'])
    files = _all_finite_files(exp)
    assert not [f for f in files if f.endswith(('net_kr_6.pth', 'net_g_6.pth', '6.state'))]
    monkeypatch.undo()
    train_main(['-opt', str(yml), '--auto_resume'], root_path=str(tmp_path))
    assert os.path.isfile(os.path.join(exp, 'models', 'net_kr_14.pth'))
    _all_finite_files(exp)
