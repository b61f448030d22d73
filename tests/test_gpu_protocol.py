"""The GPU protocol script (tools/gpu_protocol.py) on the CPU with tiny settings: pack, then the
whole run (smoke, calibration, plan, runs, outputs), so that the GPU run works the first time."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import krdistill  # noqa: F401
from test_benchmark import data_root  # noqa: F401  (the fixture)
from test_lengths import lengths_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import gpu_protocol as gp  # noqa: E402


def tiny_protocol(tmp_path):
    cfg = lengths_config()
    cfg['data']['train_hr'] = ['Train/HR']
    cfg['data']['exclude'] = []
    cfg['teacher']['checkpoint'] = None  # trained in the protocol (tiny)
    cfg['train']['preload'] = True
    cfg['lengths'] = {60: [0, 1]}
    cfg['methods'].pop('fitnet_out_fastreg')
    cfg.pop('frozen_equals')
    cfg['gpu'] = dict(deadline_s=10**6, reserve_s=0, job_overhead_s=0, min_iters=50000, floor_iters=10, step=10,
                      safety=1.0, calibrate_iters=4, calibrate_pool=16, threads=1,
                      source=dict(folders=['Train/HR', 'TestA/HR', 'TestB/HR'], exclude=['Train/HR/skip.png']))
    path = tmp_path / 'gpu_tiny.yml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_gpu_protocol_pack_and_run_on_cpu(tmp_path, data_root):  # noqa: F811
    config = tiny_protocol(tmp_path)
    man = gp.pack(data_root, None, None, tmp_path / 'pack', str(config))
    assert man['images'] == 4 + 2 + 1  # skip.png left out
    webp = sorted((tmp_path / 'pack' / 'data' / 'Train' / 'HR').iterdir())
    assert [p.suffix for p in webp] == ['.webp'] * 4
    from krdistill.io import read_image
    assert np.array_equal(read_image(webp[0]), read_image(data_root / 'Train' / 'HR' / 'im0.png'))  # lossless
    out = tmp_path / 'OUT'
    res = gp.run(tmp_path / 'pack', out, 'cpu', str(config))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gp.OUT_FILES) and len(files) <= 8  # what comes back from the GPU machine
    plan = res['plan']
    assert plan['iters'] == 60 and plan['below_target'] and plan['seeds'] == [0, 1]
    assert set(plan['s_per_iter']) == {'student_alone', 'output_kd', 'metakd_late'}
    saved = json.loads((out / 'gpu_results.json').read_text())
    assert saved['timing']['total_s'] > 0 and {'smoke_s', 'prepare_s', 'runs_s'} <= set(saved['timing'])
    assert len(saved['runs']) == 6 and all(r['iters'] == 60 for r in saved['runs'].values())
    st = torch.load(out / 'students.pth', weights_only=True)
    assert len(st['students']) == 6 and st['network']['num_feat'] == 4
    assert '**60 iterations**' in (out / 'gpu_lengths.md').read_text()


def test_plan_fits_the_deadline_and_keeps_the_floor():
    cfg = dict(lengths={81000: [0, 1]}, gpu=dict(step=1000, safety=1.0, job_overhead_s=0, floor_iters=10000))
    assert gp.plan_iters(cfg, {'a': 0.002, 'b': 0.004}, 250) == 62000   # the slowest job fits 250 s
    assert gp.plan_iters(cfg, {'a': 0.001}, 1000) == 81000               # capped at the config's length
    assert gp.plan_iters(cfg, {'a': 0.1}, 100) == 10000                  # never below the floor


def test_shipped_gpu_config_runs_the_cpu_length_study_rows():
    cfg = gp.load_protocol(ROOT / 'options/bench/gpu_h200_lengths.yml')
    with open(ROOT / 'options/bench/cpu_x4_lengths.yml') as f:
        cpu = yaml.safe_load(f)
    skip = cfg['gpu']['skip_methods']
    assert cfg['methods'] == {m: v for m, v in cpu['methods'].items() if m not in skip}
    assert {'dukd', 'dukd_eqc'} <= set(cfg['methods']) and 'method_lengths' not in cfg
    assert cfg['student'] == cpu['student'] and cfg['kd'] == cpu['kd']
    assert cfg['lengths'] == {81000: [0, 1]} and cfg['train']['preload'] and cfg['train']['lr'] == cpu['train']['lr']
    assert cfg['data']['quiz'] == cpu['data']['quiz']


@pytest.mark.parametrize('cmd', [['pack', '--help'], ['run', '--help']])
def test_cli(cmd):
    r = subprocess.run([sys.executable, str(ROOT / 'tools/gpu_protocol.py')] + cmd, capture_output=True, text=True)
    assert r.returncode == 0 and '--' in r.stdout
