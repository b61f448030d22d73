"""tools/step_cost.py (logic: tools/krbench/step_cost.py): a tiny run on CPU (seconds)."""
from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

import krdistill  # noqa: F401  (shims before basicsr)
from krbench import step_cost as sc  # tools/ (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
TINY = ['--preset', 'tiny', '--batch', '2', '--gt-size', '16', '--iters', '4', '--warmup', '1', '--threads', '1',
        '--in-process']


def _tool():
    spec = importlib.util.spec_from_file_location('_tool_step_cost', REPO / 'tools' / 'step_cost.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_rows_ratios_and_json(tmp_path, capsys):
    out = tmp_path / 'sc.json'
    result = _tool().main(TINY + ['--methods', 'student', 'output_kd', 'metakd_exact_every4', '--json', str(out)])
    rows = {r['method']: r for r in result['rows']}
    assert list(rows) == ['student', 'output_kd', 'metakd_exact_every4']
    for r in rows.values():
        assert r['s_per_iter'] > 0 and r['s_per_iter_mean'] > 0 and len(r['iter_times']) == 4
        assert all(t > 0 for t in r['iter_times'])
        assert r['s_per_iter'] == r['s_per_iter_best'] <= r['s_per_iter_mean'] + 1e-12  # one cycle of 4 here
        # ratios against the rows of this very run
        assert r['x_student'] == pytest.approx(r['s_per_iter'] / rows['student']['s_per_iter'])
        assert r['x_output_kd'] == pytest.approx(r['s_per_iter'] / rows['output_kd']['s_per_iter'])
        assert r['peak_mb'] >= 0
    assert rows['student']['x_student'] == pytest.approx(1.0)
    assert rows['output_kd']['x_output_kd'] == pytest.approx(1.0)
    meta = rows['metakd_exact_every4']
    assert meta['meta_iters'] == 1  # iterations 1..4 with every 4: one meta step, averaged over the cycle
    assert meta['t_meta_model'] > 0 and meta['phases']['meta_step'] > 0
    assert meta['phases_mean']['calls_per_iter']['meta_step'] == pytest.approx(0.25)
    assert meta['phases_mean']['calls_per_iter']['meta.autograd_create_graph'] == pytest.approx(0.25)
    assert rows['output_kd']['phases']['teacher_forward'] > 0
    assert 'meta_step' not in rows['output_kd']['phases']
    # JSON on disk, markdown on stdout
    data = json.loads(out.read_text())
    assert [r['method'] for r in data['rows']] == list(rows)
    assert data['config']['preset'] == 'tiny' and data['config']['cycle'] == 4
    assert data['config']['command'].startswith('python tools/step_cost.py --preset tiny')
    assert {t['row'] for t in data['targets']} == {'metakd_exact_every4'}
    text = capsys.readouterr().out
    assert '| method | s/iter | x student-alone | x output KD | peak MB |' in text
    assert '| metakd_exact_every4 |' in text


def test_worker_protocol(tmp_path, monkeypatch, capsys):
    """What one isolated subprocess runs (``python -m krbench.step_cost --one ... [--serve]``), in-process."""
    cfg = sc.make_config(preset='tiny', batch=2, gt_size=16, iters=2, warmup=1, threads=1)
    spec = tmp_path / 'cfg.json'
    spec.write_text(json.dumps(dict(cfg=cfg, teacher_ckpt=None, cycle=1)))
    assert sc.worker_main(['--one', 'student', '--config', str(spec), '--out', str(tmp_path / 'r.json')]) == 0
    row = json.loads((tmp_path / 'r.json').read_text())
    assert row['method'] == 'student' and row['s_per_iter_mean'] > 0 and row['peak_abs_mb'] > 0
    # --serve: the interleaved schedule's commands, one marked JSON answer each
    monkeypatch.setattr('sys.stdin', io.StringIO('warmup\ncycle\ncycle\nfinish\n'))
    capsys.readouterr()
    assert sc.worker_main(['--one', 'student', '--config', str(spec), '--out', str(tmp_path / 's.json'), '--serve']) == 0
    answers = [json.loads(ln[len(sc.MARK):]) for ln in capsys.readouterr().out.splitlines()
               if ln.startswith(sc.MARK)]
    assert [sorted(a) for a in answers] == [['built'], ['warm'], ['seconds'], ['seconds'], ['done']]
    row = json.loads((tmp_path / 's.json').read_text())
    assert len(row['iter_times']) == 2 and row['s_per_iter_best'] == min(row['iter_times'])


def test_options_for_every_method_and_checks(tmp_path):
    cfg = sc.make_config()
    assert (cfg['batch'], cfg['gt_size'], cfg['iters'], cfg['warmup'], cfg['preset']) == (16, 96, 10, 2, 'edsr')
    for m in sc.METHODS:
        opt = sc.build_options(m, cfg, 'teacher.pth', str(tmp_path))
        assert opt['model_type'] == sc.METHODS[m]['model_type']
        assert opt['network_g']['num_feat'] == 16 and opt['network_g']['upscale'] == 4
        if m != 'student':
            assert opt['network_t']['num_feat'] == 64 and opt['path']['pretrain_network_t'] == 'teacher.pth'
    assert sc.build_options('metakd_fd_every4', cfg, 't', str(tmp_path))['meta']['mode'] == 'finite_difference'
    assert sc.build_options('metakd_fd_every4', cfg, 't', str(tmp_path))['meta']['every'] == 4
    assert sc.build_options('fakd', cfg, 't', str(tmp_path))['train']['kd_opt']['max_size'] == 24
    big = sc.make_config(preset='edsr-l')
    assert sc.build_options('output_kd', big, 't', str(tmp_path))['network_t']['num_feat'] == 256
    with pytest.raises(ValueError, match='gt-size'):
        sc.make_config(preset='edsr', gt_size=90)
    with pytest.raises(ValueError, match='--methods'):
        sc.run(['nope'], preset='tiny')


def test_kr_overrides(tmp_path):
    assert sc.parse_kr(['width=32', 'hidden=16', 'use_correlation=false']) == dict(
        width=32, hidden=16, use_correlation=False)
    cfg = sc.make_config(kr=dict(width=32, num_kernels=4))
    kr = sc.build_options('metakd_exact_every1', cfg, 't', str(tmp_path))['network_kr']
    assert (kr['width'], kr['num_kernels'], kr['hidden']) == (32, 4, 64)
    with pytest.raises(KeyError, match='--kr'):
        sc.build_options('metakd_exact_every1', sc.make_config(kr=dict(s_channels=3)), 't', str(tmp_path))
