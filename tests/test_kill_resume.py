"""SIGKILL during training, then ``--auto_resume``: iteration, student, EMA, KRNets, both optimizers
and schedulers come back from the last complete checkpoint."""
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import tiny_metakd_opt, write_yaml
from basicsr.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_sigkill_then_auto_resume(tmp_path):
    opt = tiny_metakd_opt(tmp_path, total_iter=100000, ema_decay=0.9)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=3)
    opt['datasets'].pop('val')
    opt.pop('val')
    yml = write_yaml(opt, tmp_path / 'long.yml')
    env = dict(os.environ, OMP_NUM_THREADS='1', KRDISTILL_AUTOLOAD='0')
    cmd = [sys.executable, str(REPO / 'krdistill' / 'train.py'), '-opt', str(yml)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = tmp_path / 'experiments' / opt['name'] / 'training_states'
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len([p for p in states.glob('*.state')]) < 2:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(int(p.stem) for p in states.glob('*.state'))
    assert len(done) >= 2, 'no checkpoint before the deadline'
    last = done[-1]

    # resume: a short continuation through the real pipeline
    opt2 = copy.deepcopy(opt)
    opt2['train']['total_iter'] = last + 2
    out = subprocess.run(cmd[:2] + ['-opt', str(write_yaml(opt2, tmp_path / 'resume.yml')), '--auto_resume'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f'iter: {last}.' in out.stderr + out.stdout and 'Resuming training from epoch' in out.stderr + out.stdout
    models = tmp_path / 'experiments' / opt['name'] / 'models'
    assert (models / 'net_g_latest.pth').is_file() and (models / 'net_kr_latest.pth').is_file()

    # what resume restores, piece by piece, against the files of the last complete checkpoint
    # the training state holds plain values only: it loads with weights_only (krdistill/resume.py)
    state = torch.load(states / f'{last}.state', map_location='cpu', weights_only=True)
    assert state['iter'] == last
    ropt = copy.deepcopy(opt)
    ropt['path'].update(resume_state=str(states / f'{last}.state'), pretrain_network_g=str(models / f'net_g_{last}.pth'))
    model = build_model(ropt)
    model.resume_training(state)
    g = torch.load(models / f'net_g_{last}.pth', map_location='cpu')
    for k, v in model.net_g.state_dict().items():
        assert torch.equal(v, g['params'][k]), k
    for k, v in model.net_g_ema.state_dict().items():
        assert torch.equal(v, g['params_ema'][k]), k
    kr = torch.load(models / f'net_kr_{last}.pth', map_location='cpu')['params']
    for k, v in model.net_kr.state_dict().items():
        assert torch.equal(v, kr[k]), k
    for opt_now, saved in zip(model.optimizers, state['optimizers']):
        now = opt_now.state_dict()
        assert int(now['state'][0]['step']) == last
        for pid, s in saved['state'].items():
            assert torch.equal(now['state'][pid]['exp_avg'], s['exp_avg'])
    for sched, saved in zip(model.schedulers, state['schedulers']):
        assert sched.last_epoch == saved['last_epoch']
