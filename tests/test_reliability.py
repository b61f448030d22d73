"""Non-finite losses are skipped and stop training cleanly; checkpoints are written crash-safe."""
import copy
import os

import pytest
import torch

from helpers import tiny_metakd_opt, tiny_opt
from basicsr.data import build_dataset
from basicsr.models import build_model


def _batch(opt):
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    return torch.utils.data.default_collate([ds[0], ds[1]])


def _prepare(opt):
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)


@pytest.mark.parametrize('make_opt', [
    lambda p: tiny_opt(p, kd_opt=dict(type='FitNetLoss'), max_nonfinite=3),
    lambda p: tiny_metakd_opt(p, max_nonfinite=3),
], ids=['KDSRModel', 'MetaKDModel'])
def test_nonfinite_steps_are_skipped_then_training_stops_with_a_good_checkpoint(tmp_path, make_opt):
    opt = make_opt(tmp_path)
    _prepare(opt)
    model = build_model(opt)
    good = _batch(opt)
    model.feed_data(good)
    model.optimize_parameters(1)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    bad = dict(good, lq=torch.full_like(good['lq'], float('nan')))
    model.feed_data(bad)
    for it in (2, 3):
        model.optimize_parameters(it)  # skipped: weights untouched
        for k, v in model.net_g.state_dict().items():
            assert torch.equal(v, before[k]), k
    with pytest.raises(FloatingPointError, match='max_nonfinite|non-finite steps in a row|in a row skipped on non-finite'):
        model.optimize_parameters(4)
    saved = torch.load(os.path.join(opt['path']['models'], 'net_g_4.pth'), map_location='cpu')['params']
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert os.path.isfile(os.path.join(opt['path']['training_states'], '4.state'))
    # a finite step in between resets the count
    model._nonfinite = 0
    model.feed_data(good)
    model.optimize_parameters(5)
    assert model._nonfinite == 0


def test_refuses_to_save_nan_weights(tmp_path):
    opt = tiny_opt(tmp_path)
    _prepare(opt)
    model = build_model(opt)
    with torch.no_grad():
        next(model.net_g.parameters()).fill_(float('nan'))
    with pytest.raises(FloatingPointError, match='non-finite'):
        model.save(0, 7)
    assert not os.path.exists(os.path.join(opt['path']['models'], 'net_g_7.pth'))


def test_save_is_atomic(tmp_path, monkeypatch):
    opt = tiny_metakd_opt(tmp_path)
    _prepare(opt)
    model = build_model(opt)
    model.save(0, 10)
    models, states = opt['path']['models'], opt['path']['training_states']
    assert sorted(os.listdir(models)) == ['net_g_10.pth', 'net_kr_10.pth']
    assert os.listdir(states) == ['10.state']

    def crash(*args, **kwargs):  # a kill while the training state is being written
        raise KeyboardInterrupt
    monkeypatch.setattr(type(model), 'save_training_state', crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(0, 20)
    # nothing of iteration 20 is visible: resume still finds a complete iteration 10
    assert [n for n in os.listdir(states) if not n.startswith('.')] == ['10.state']
    assert 'net_g_20.pth' not in os.listdir(models)
    from krdistill.entry import load_resume_state
    ropt = dict(copy.deepcopy(opt), auto_resume=True)
    assert load_resume_state(ropt)['iter'] == 10
    monkeypatch.undo()
    model.save(0, 30)  # the leftover temporary folders are removed by the next save
    assert sorted(os.listdir(states)) == ['10.state', '30.state']
    assert not [n for n in os.listdir(models) if n.startswith('.')]
