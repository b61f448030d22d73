"""Training states hold plain values and load with ``torch.load(weights_only=True)``; a file holding
anything else is refused and never unpickled; krdistill-train resumes on the CPU, keeps the teacher's
settings, and resumes a state written with ``epoch: -1`` (krdistill/resume.py, krdistill/entry.py)."""
import os
import random
import re

import numpy as np
import pytest
import torch
from basicsr.models.lr_scheduler import CosineAnnealingRestartLR, MultiStepRestartLR

from helpers import tiny_opt, write_yaml
from krdistill import entry
from krdistill.resume import (RefusedStateError, load_training_state, plain_state, restore_host_rng, restore_torch_rng,
                              rng_state)
from krdistill.train import main as train_main

PLAIN = (torch.Tensor, int, float, str, bytes, bool, type(None))


def _assert_plain(obj, where='state'):
    if isinstance(obj, dict):
        assert type(obj) is dict, f'{where}: {type(obj).__name__}'
        for k, v in obj.items():
            _assert_plain(v, f'{where}[{k!r}]')
    elif isinstance(obj, (list, tuple)):
        assert type(obj) in (list, tuple), f'{where}: {type(obj).__name__}'
        for i, v in enumerate(obj):
            _assert_plain(v, f'{where}[{i}]')
    else:
        assert isinstance(obj, PLAIN), f'{where}: {type(obj).__name__}'


def _optimizer_and_schedulers():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=1e-2)
    scheds = [MultiStepRestartLR(opt, milestones=[2, 4, 4], gamma=0.5),
              CosineAnnealingRestartLR(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-2),
                                       periods=[5, 5], restart_weights=[1, 0.5])]
    return p, opt, scheds


def test_rng_state_is_plain_and_restores():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached gaussian in NumPy's state
    state = rng_state()
    _assert_plain(state)
    expected = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_host_rng(state)
    restore_torch_rng(state)
    got = (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_plain_state_turns_counter_into_dict_and_the_scheduler_behaves_the_same(tmp_path):
    p, opt, scheds = _optimizer_and_schedulers()
    for it in range(3):
        p.sum().backward()
        opt.step()
        for s in scheds:
            s.step()
    sched_states = [s.state_dict() for s in scheds]
    assert type(sched_states[0]['milestones']).__name__ == 'Counter'
    state = {'epoch': 0, 'iter': 3, 'optimizers': [opt.state_dict()], 'schedulers': sched_states,
             'krdistill': {'ranks': [{'rng': rng_state(),
                                      'meta_state': {'last_batch': (torch.ones(1), torch.zeros(1))}}]}}
    plain = plain_state(state)
    _assert_plain(plain)
    assert plain['schedulers'][0]['milestones'] == {2: 1, 4: 2}
    path = tmp_path / '3.state'
    torch.save(plain, path)
    loaded = load_training_state(str(path))
    _assert_plain(loaded)

    # a scheduler resumed from the plain dict gives the learning rates of the original
    p2, opt2, scheds2 = _optimizer_and_schedulers()
    opt2.load_state_dict(loaded['optimizers'][0])
    for s, st in zip(scheds2, loaded['schedulers']):
        s.load_state_dict(st)
    for _ in range(5):
        for o in (opt, opt2):
            o.step()
        for a, b in zip(scheds, scheds2):
            a.step()
            b.step()
            assert a.get_last_lr() == b.get_last_lr()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _payload_state(path, marker):
    torch.save({'epoch': 0, 'iter': 5, 'optimizers': [], 'schedulers': [], 'x': _Payload(marker)}, path)


def test_load_training_state_refuses_a_pickle_with_code(tmp_path):
    marker, path = tmp_path / 'marker', tmp_path / 'evil.state'
    _payload_state(path, marker)
    with pytest.raises(RefusedStateError) as e:
        load_training_state(str(path))
    assert str(path) in str(e.value) and 'other than tensors' in str(e.value) and 'system' in str(e.value)
    assert not marker.exists()
    torch.save({'iter': 1, 't': torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match='cannot read the training state'):
        load_training_state(str(path))


@pytest.mark.parametrize('how', ['path.resume_state', '--auto_resume'])
def test_krdistill_train_refuses_a_pickle_with_code(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'marker'
    opt = tiny_opt(tmp_path)
    args = []
    if how == '--auto_resume':
        states = tmp_path / 'experiments' / opt['name'] / 'training_states'
        states.mkdir(parents=True)
        evil = states / '5.state'
        args = ['--auto_resume']
    else:
        evil = tmp_path / 'evil.state'
        opt['path']['resume_state'] = str(evil)
    _payload_state(evil, marker)
    yml = write_yaml(opt, tmp_path / 'opt.yml')
    with pytest.raises(RefusedStateError) as e:
        train_main(['-opt', str(yml), *args], root_path=str(tmp_path))
    assert str(evil) in str(e.value) and 'will not load it' in str(e.value)
    assert not marker.exists()


def test_check_resume_keeps_the_teacher():
    opt = {'network_g': {}, 'network_t': {}, 'network_kr': {},
           'path': {'resume_state': 'x/7.state', 'models': 'm', 'pretrain_network_t': 't.pth',
                    'param_key_t': 'params_ema',
                    'param_key_g': 'params_ema', 'ignore_resume_networks': None}}
    entry.check_resume(opt, 7)
    p = opt['path']
    assert p['pretrain_network_t'] == 't.pth' and p['param_key_t'] == 'params_ema'  # the teacher's file and key
    assert p['ignore_resume_networks'] == ['network_t']
    assert p['pretrain_network_g'] == os.path.join('m', 'net_g_7.pth') and p['param_key_g'] == 'params'  # BasicSR's
    assert p['pretrain_network_kr'] == os.path.join('m', 'net_kr_7.pth')


def test_resume_state_loads_on_the_cpu(tmp_path, monkeypatch):
    states = tmp_path / 'experiments' / 'run' / 'training_states'
    states.mkdir(parents=True)
    torch.save({'epoch': 1, 'iter': 5, 't': torch.ones(2)}, states / '5.state')
    torch.save({'epoch': 0, 'iter': 3}, states / '3.state')
    (states / '.tmp_9').mkdir()  # left by a killed save: not a state
    models = tmp_path / 'experiments' / 'run' / 'models'
    models.mkdir()
    for it in (3, 5):  # an iteration is complete with its net_g
        torch.save({'params': {'w': torch.ones(2)}}, models / f'net_g_{it}.pth')
    opt = {'name': 'run', 'root_path': str(tmp_path), 'auto_resume': True, 'num_gpu': 1,
           'path': {'resume_state': None, 'models': 'm'}}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    state = entry.load_resume_state(opt)
    assert state['iter'] == 5 and state['t'].device.type == 'cpu'
    assert opt['path']['resume_state'] == str(states / '5.state')
    with pytest.raises(FileNotFoundError, match='path.resume_state: no such file'):
        entry.load_resume_state(dict(opt, auto_resume=False, path={'resume_state': str(tmp_path / 'no.state')}))


def _sr_opt(root, total_iter):
    """A tiny SRModel run through krdistill-train: 4 batches per epoch, a checkpoint at 5 (mid-epoch)."""
    opt = tiny_opt(root, total_iter=total_iter)
    opt.update(name='epoch_minus_one', model_type='SRModel')
    for k in ('network_t', 'kd'):
        opt.pop(k)
    for k in ('pretrain_network_t', 'param_key_t', 'strict_load_t', 'ignore_resume_networks'):
        opt['path'].pop(k)
    opt['train'] = {k: v for k, v in opt['train'].items()
                    if k in ('ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'pixel_opt')}
    opt['datasets']['train']['dataset_enlarge_ratio'] = 2
    opt['datasets'].pop('val')
    opt.pop('val')
    opt['logger'].update(print_freq=1, save_checkpoint_freq=5)
    return opt


def test_resume_from_a_state_written_with_epoch_minus_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_main(['-opt', str(write_yaml(_sr_opt(tmp_path, 5), tmp_path / 'a.yml'))], root_path=str(tmp_path))
    exp = tmp_path / 'experiments' / 'epoch_minus_one'
    state_path = exp / 'training_states' / '5.state'
    state = load_training_state(str(state_path))
    assert state['epoch'] == 1
    state['epoch'] = -1  # as written when training stops on non-finite values
    torch.save(plain_state(state), state_path)
    for log in exp.glob('train_*.log'):
        log.unlink()
    train_main(['-opt', str(write_yaml(_sr_opt(tmp_path, 8), tmp_path / 'b.yml')), '--auto_resume'],
               root_path=str(tmp_path))
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'the training state of iter 5 has no epoch; epoch 1 from 4 batches per epoch' in log
    assert 'Resuming training from epoch: 1, iter: 5.' in log
    assert 'Resuming mid-epoch: epoch 1 continues after the 1 of its 4 batches' in log
    assert re.findall(r'\[epoch:\s*(\d+), iter:\s*(\d+(?:,\d{3})*)', log) == [('1', '6'), ('1', '7'), ('1', '8')]
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
