"""Two-process ``torchrun`` (gloo, CPU) training equals one process with the same global batch.

The teacher is never wrapped; the meta step runs on the bare student with the virtual-step
gradient and the KRNet gradients averaged over ranks; the meta batch (here the previous
training batch) is sharded like the training batch.
"""
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_metakd_opt, write_pairs, write_yaml

REPO = Path(__file__).resolve().parents[1]
ITERS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _opt(root: Path, batch: int, mode: str) -> dict:
    opt = tiny_metakd_opt(root, total_iter=ITERS, meta=dict(mode=mode))
    if mode == 'finite_difference':
        # the virtual step is the student optimizer's: Adam's first steps are about lr * sign(g), whose
        # derivative is huge where g ~ 0, so finite differences through it amplify round-off (the order of
        # the ranks' sums) beyond any tolerance; SGD with momentum keeps the check about DDP
        opt['train']['optim_g'] = dict(type='SGD', lr=0.05, momentum=0.9)
    hr, lr = write_pairs(root / 'ddp_data', n=8, size=32, scale=2, seed=1)
    for key in ('train',):
        opt['datasets'][key].update(dataroot_gt=str(hr), dataroot_lq=str(lr), gt_size=32, use_hflip=False,
                                    use_rot=False, batch_size_per_gpu=batch)
    opt['datasets'].pop('val')
    opt.pop('val')
    opt['logger'].update(print_freq=1, save_checkpoint_freq=ITERS)
    return opt


def _losses(root: Path, name: str) -> list[float]:
    text = ''.join(p.read_text() for p in (root / 'experiments' / name).glob('train_*.log'))
    return [float(v) for v in re.findall(r'l_pix: ([0-9.e+-]+)', text)]


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_two_process_ddp_matches_single_process(tmp_path, mode):
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1', KRDISTILL_AUTOLOAD='0')
    single, multi = tmp_path / 'single', tmp_path / 'ddp'
    runs = {}
    for root, batch, launcher in ((single, 4, None), (multi, 2, 'pytorch')):
        root.mkdir()
        opt = _opt(root, batch, mode)
        yml = write_yaml(opt, root / 'opt.yml')
        cmd = [sys.executable, str(REPO / 'krdistill' / 'train.py'), '-opt', str(yml)]
        if launcher:
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                   str(_free_port()), *cmd[1:], '--launcher', launcher]
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
        runs[root] = opt
    name = runs[single]['name']
    l_single, l_multi = _losses(single, name), _losses(multi, name)
    assert len(l_single) == len(l_multi) == ITERS
    assert l_single == pytest.approx(l_multi, rel=2e-3)  # logged with 4 significant digits
    for label in ('g', 'kr'):
        a = torch.load(single / 'experiments' / name / 'models' / f'net_{label}_{ITERS}.pth')['params']
        b = torch.load(multi / 'experiments' / name / 'models' / f'net_{label}_{ITERS}.pth')['params']
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f'net_{label} {k}: ' \
                f'max diff {(a[k] - b[k]).abs().max().item():.2e}'
    # the meta step ran and moved the KRNets (the comparison is not vacuous)
    log = ''.join(p.read_text() for p in (single / 'experiments' / name).glob('train_*.log'))
    norms = [float(v) for v in re.findall(r'meta_grad_norm: ([0-9.e+-]+)', log)]
    assert len(norms) == ITERS and all(n > 0 for n in norms)
    # exact resume: every rank's random states and meta fallback batch are in the training state
    # the training state holds plain values only: it loads with weights_only (krdistill/resume.py)
    state = torch.load(multi / 'experiments' / name / 'training_states' / f'{ITERS}.state', weights_only=True)
    ranks = state['krdistill']['ranks']
    assert len(ranks) == 2
    assert ranks[0]['rng']['python'] != ranks[1]['rng']['python']  # BasicSR seeds seed + rank
    assert not torch.equal(ranks[0]['meta_state']['last_batch'][0], ranks[1]['meta_state']['last_batch'][0])
