"""Nothing non-finite is read or written without a word, and every file error names the file and the
option key that pointed to it (issue 28, principles 4 and 5), through ``krdistill-train``."""
from __future__ import annotations

import copy
import errno
import glob
import os
from pathlib import Path

import pytest
import torch

from helpers import save_teacher, tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.io import CheckpointError, NonFiniteError
from krdistill.train import main as train_main


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


def _nan_checkpoint(path: Path, net_opt: dict, tensor: str = 'conv_first.weight', value=float('nan')) -> Path:
    save_teacher(path, net_opt)
    ckpt = torch.load(path, weights_only=True)
    ckpt['params'][tensor].view(-1)[3] = value
    torch.save(ckpt, path)
    return path


def _truncated(path: Path, net_opt: dict, keep: float = 0.6) -> Path:
    save_teacher(path, net_opt)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def _pickled(path: Path, marker: Path) -> Path:
    torch.save({'params': _Payload(marker)}, path)
    return path


def _log(tmp_path: Path, name: str) -> str:
    return ''.join(Path(p).read_text() for p in glob.glob(str(tmp_path / 'experiments' / name / 'train_*.log')))


def _run(tmp_path: Path, opt: dict, *args: str):
    yml = write_yaml(copy.deepcopy(opt), tmp_path / f'{opt["name"]}.yml')
    return train_main(['-opt', str(yml), *args], root_path=str(tmp_path))


def _assert_not_started(tmp_path: Path, opt: dict) -> None:
    exp = tmp_path / 'experiments' / opt['name']
    assert 'Start training' not in _log(tmp_path, opt['name'])
    assert not list(exp.glob('models/*.pth'))


# ------------------------------------------------------------------ teacher, pretrained student, KRNets
FILES = {  # what is wrong with the file -> (make it, error type, words the message must hold)
    'NaN': (lambda p, net, m: _nan_checkpoint(p, net), NonFiniteError,
            ['params.conv_first.weight (1 NaN of', 'non-finite']),
    'inf': (lambda p, net, m: _nan_checkpoint(p, net, 'body.0.conv1.bias', float('inf')), NonFiniteError,
            ['params.body.0.conv1.bias (1 inf of']),
    'truncated': (lambda p, net, m: _truncated(p, net), CheckpointError, ['truncated, damaged or not a torch']),
    'pickled code': (lambda p, net, m: _pickled(p, m), CheckpointError,
                     ['objects other than tensors', 'posix.system', 'nothing in it was run']),
    'missing': (lambda p, net, m: p, FileNotFoundError, ['no such file']),
    'empty': (lambda p, net, m: (p.write_bytes(b''), p)[1], CheckpointError, ['truncated']),
}


@pytest.mark.parametrize('what', FILES)
@pytest.mark.parametrize('key', ['path.pretrain_network_t', 'path.pretrain_network_g'])
def test_bad_checkpoint_is_refused_naming_the_file_and_key(tmp_path, key, what):
    make, error, words = FILES[what]
    marker = tmp_path / 'ran'
    opt = tiny_opt(tmp_path, total_iter=2)
    net = opt['network_t'] if key.endswith('_t') else opt['network_g']
    path = make(tmp_path / 'bad.pth', net, marker)
    opt['path'][key.split('.')[1]] = str(path)
    with pytest.raises(error) as e:
        _run(tmp_path, opt)
    msg = str(e.value)
    assert msg.startswith(f'{key}: ') and str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert 'weights_only=False' not in msg and 'last good state' not in msg
    assert not marker.exists()
    _assert_not_started(tmp_path, opt)


def test_nan_pretrained_krnet_is_refused(tmp_path):
    opt = tiny_metakd_opt(tmp_path, total_iter=2)
    krnet_file = tmp_path / 'kr.pth'
    state = {'0.weight': torch.tensor([1.0, float('nan')])}
    torch.save({'params': state}, krnet_file)
    opt['path']['pretrain_network_kr'] = str(krnet_file)
    with pytest.raises(NonFiniteError, match=r'path\.pretrain_network_kr: .*kr\.pth.*params\.0\.weight \(1 NaN of 2\)'):
        _run(tmp_path, opt)
    _assert_not_started(tmp_path, opt)


# ------------------------------------------------------------------ resume
def _trained(tmp_path: Path, total_iter: int = 4, every: int = 2) -> dict:
    opt = tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'), total_iter=total_iter)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=every)
    opt['val']['val_freq'] = 100
    _run(tmp_path, opt)
    return opt


@pytest.mark.parametrize('damage', ['net_g truncated', 'state truncated', 'net_kd truncated', 'net_g NaN',
                                    'net_g missing'])
def test_auto_resume_passes_over_an_incomplete_iteration_and_says_so(tmp_path, damage):
    opt = _trained(tmp_path, total_iter=4, every=2)
    exp = tmp_path / 'experiments' / opt['name']
    target = {'net_g truncated': exp / 'models' / 'net_g_4.pth', 'net_g NaN': exp / 'models' / 'net_g_4.pth',
              'net_g missing': exp / 'models' / 'net_g_4.pth', 'net_kd truncated': exp / 'models' / 'net_kd_4.pth',
              'state truncated': exp / 'training_states' / '4.state'}[damage]
    if damage == 'net_g NaN':
        ckpt = torch.load(target, weights_only=True)
        next(iter(ckpt['params'].values())).view(-1)[0] = float('nan')
        torch.save(ckpt, target)
    elif damage == 'net_g missing':
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:300])
    opt['train']['total_iter'] = 6
    _run(tmp_path, opt, '--auto_resume')
    log = _log(tmp_path, opt['name'])
    assert '--auto_resume: passed over iteration 4' in log and str(target) in log, log[-3000:]
    assert 'resuming from iteration 2, the last complete state' in log
    assert 'Resuming training from epoch' in log and 'iter: 2' in log
    assert torch.load(exp / 'models' / 'net_g_6.pth', weights_only=True)['params']  # the run went on to the end


def test_auto_resume_without_any_complete_iteration_names_each_problem(tmp_path):
    opt = _trained(tmp_path, total_iter=2, every=2)
    exp = tmp_path / 'experiments' / opt['name']
    (exp / 'models' / 'net_g_2.pth').write_bytes(b'PK\x03\x04 not a whole file')
    with pytest.raises(ValueError) as e:
        _run(tmp_path, opt, '--auto_resume')
    msg = str(e.value)
    assert msg.startswith('path.resume_state (--auto_resume): no complete training state in')
    assert 'iteration 2' in msg and 'net_g_2.pth' in msg and 'truncated' in msg


def test_explicit_resume_state_with_nan_or_truncated_files_names_them(tmp_path):
    opt = _trained(tmp_path, total_iter=2, every=2)
    exp = tmp_path / 'experiments' / opt['name']
    state = exp / 'training_states' / '2.state'
    opt['path']['resume_state'] = str(state)
    opt['train']['total_iter'] = 4
    saved = state.read_bytes()
    s = torch.load(state, weights_only=True)
    moment = next(iter(s['optimizers'][0]['state'].values()))['exp_avg']
    moment.view(-1)[0] = float('nan')
    torch.save(s, state)
    with pytest.raises(NonFiniteError) as e:
        _run(tmp_path, opt)
    assert str(e.value).startswith(f'path.resume_state: {state} holds non-finite values')
    assert 'optimizers[0].state.' in str(e.value) and 'exp_avg (1 NaN of' in str(e.value)
    state.write_bytes(saved)
    net_g = exp / 'models' / 'net_g_2.pth'
    net_g.write_bytes(net_g.read_bytes()[:200])
    with pytest.raises(CheckpointError) as e:
        _run(tmp_path, opt)
    msg = str(e.value)
    assert msg.startswith(f'path.pretrain_network_g (set by resuming from {state}): cannot read {net_g}'), msg


# ------------------------------------------------------------------ saving: a full or read-only disk
@pytest.mark.parametrize('failure,cause', [
    (OSError(errno.ENOSPC, 'No space left on device'), 'the disk is full'),
    (OSError(errno.EROFS, 'Read-only file system'), 'the file system is read-only'),
    (RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 6272 vs 6160'), 'the disk is full'),
])
@pytest.mark.parametrize('which', ['net_g', 'training state'])
def test_failed_save_names_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, failure, cause, which):
    import shutil
    from collections import namedtuple
    opt = tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'), total_iter=4)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2)
    opt['val']['val_freq'] = 100
    exp = tmp_path / 'experiments' / opt['name']
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        name = os.path.basename(str(f))
        if name == ('net_g_4.pth' if which == 'net_g' else '4.state'):
            with open(f, 'wb') as fh:  # part of the file reaches the disk, then the write fails
                fh.write(b'PK\x03\x04partial')
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', failing_save)
    if isinstance(failure, RuntimeError):  # torch's own writer says nothing: the free space does
        usage = namedtuple('usage', 'total used free')
        monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(CheckpointError) as e:
        _run(tmp_path, opt)
    msg = str(e.value)
    written = 'net_g_4.pth' if which == 'net_g' else '4.state'
    key = 'path.models' if which == 'net_g' else 'path.training_states'
    assert f'{key}: cannot write ' in msg and written in msg and cause in msg, msg
    assert 'saving iteration 4 failed' in msg and 'the last good state on disk is iteration 2' in msg
    # iteration 2 is untouched and complete; nothing of iteration 4 and no temporary folder is left
    models = sorted(p.name for p in (exp / 'models').iterdir())
    states = sorted(p.name for p in (exp / 'training_states').iterdir())
    assert models == ['net_g_2.pth', 'net_kd_2.pth'] and states == ['2.state'], (models, states)
    monkeypatch.undo()
    opt['train']['total_iter'] = 4
    _run(tmp_path, opt, '--auto_resume')  # the disk is fine again: the run continues from iteration 2
    assert 'iter: 2' in _log(tmp_path, opt['name']) and (exp / 'models' / 'net_g_4.pth').is_file()


# ------------------------------------------------------------------ "the last good state" is true
def test_last_good_state_messages_are_true(tmp_path):
    from basicsr.models import build_model
    opt = tiny_opt(tmp_path)
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)
    model = build_model(opt)
    with torch.no_grad():
        next(model.net_g.parameters()).fill_(float('nan'))
    with pytest.raises(FloatingPointError) as e:
        model.save(0, 3)
    assert 'this run has saved no checkpoint yet' in str(e.value) and 'last good state on disk' not in str(e.value)
    torch.save({'iter': 2}, os.path.join(opt['path']['training_states'], '2.state'))
    with pytest.raises(FloatingPointError) as e:
        model.save(0, 3)
    assert 'the last good state on disk is iteration 2' in str(e.value)
    # and the streak stop, when the weights themselves are not finite
    model._nonfinite, model.max_nonfinite = 9, 10
    with pytest.raises(FloatingPointError, match=r'so nothing was saved; the last good state on disk is iteration 2'):
        model._skip(3, 'l_total is nan')


def test_teacher_with_nan_weight_never_trains(tmp_path):
    """The issue's case: a NaN teacher with total_iter 4 used to train, skip, and exit 0."""
    opt = tiny_opt(tmp_path, total_iter=4)
    _nan_checkpoint(Path(opt['path']['pretrain_network_t']), opt['network_t'])
    with pytest.raises(NonFiniteError, match=r'^path\.pretrain_network_t: .*teacher\.pth holds non-finite'):
        _run(tmp_path, opt)
    _assert_not_started(tmp_path, opt)


def test_mmengine_checkpoint_with_nan_is_refused(tmp_path):
    pytest.importorskip('mmengine')
    import krdistill.mmengine  # noqa: F401  (applies the checkpoint loader wrapper)
    from mmengine.runner.checkpoint import CheckpointLoader
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1}, 'state_dict': {'student.conv.weight': torch.ones(2)},
                'optimizer': {'state': {0: {'exp_avg': torch.tensor([0.0, float('nan')])}}}}, path)
    with pytest.raises(NonFiniteError, match=r'epoch_1\.pth holds non-finite .*optimizer\.state\.0\.exp_avg \(1 NaN'):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    torch.save({'meta': {'epoch': 1}, 'state_dict': {'student.conv.weight': torch.ones(2)}}, path)
    assert CheckpointLoader.load_checkpoint(str(path), map_location='cpu')['meta']['epoch'] == 1
