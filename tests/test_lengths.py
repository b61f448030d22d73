"""Gaps against training length (tools/krbench/lengths.py) on tiny synthetic data: every
(length, method, seed) job, the quiz split, the late start, the summary, resume."""
import json

import numpy as np
import pytest

import krdistill  # noqa: F401
from krbench import benchmark as bench  # tools/ (tests/conftest.py)
from krbench import lengths as bl
from test_benchmark import FITNET, OUTPUT_KD, data_root, tiny_config  # noqa: F401  (the fixture)


def lengths_config():
    cfg = tiny_config()
    cfg.pop('ablations')
    cfg['data']['quiz'] = dict(fraction=0.25, seed=0)
    cfg['pool'].update(quiz_size=8)
    meta = dict(cfg['methods']['metakd_exact'])
    meta['network_kr'] = dict(meta['network_kr'], fitnet_branch=True, learn_fitnet_weight=False)
    meta['meta'] = dict(every=2, mode='exact', virtual_step='optimizer', objective='horizon')
    cfg['methods'] = dict(student_alone={}, output_kd=dict(OUTPUT_KD),
                          fitnet_out_fastreg=dict(OUTPUT_KD, kd_opt=dict(FITNET),
                                                  optim_kd={'lr': 1e-2, 'betas': [0.9, 0.999]}),
                          metakd_late=dict(OUTPUT_KD, **meta, meta_data='quiz', start_fraction=0.5))
    cfg['lengths'] = {4: [0, 1], 8: [0]}
    cfg['frozen_equals'] = 'fitnet_out_fastreg'
    return cfg


def test_lengths_tiny_run_summary_and_resume(tmp_path, data_root):  # noqa: F811
    out = tmp_path / 'run'
    s = bl.run_lengths(lengths_config(), data_root, out, workers=0)
    assert [e['iters'] for e in s['lengths']] == [4, 8]
    runs = json.loads((out / 'lengths.json').read_text())['runs']
    assert len(runs) == 4 * 2 + 4 * 1
    for name in ('lengths.md', 'lengths.png', 'reference.json', 'gap_curves_8.png'):
        assert (out / name).is_file(), name
    e4 = s['lengths'][0]
    rows = {r['method']: r for r in e4['rows']}
    gap = rows['output_kd']['TestA_gap']
    want = [runs[f'output_kd_s{k}_i4']['tests']['TestA']['psnr'] - runs[f'student_alone_s{k}_i4']['tests']['TestA']
            ['psnr'] for k in (0, 1)]
    assert gap['values'] == pytest.approx(want) and gap['seeds'] == [0, 1]
    assert e4['lead']['TestA'] == pytest.approx(s['teacher']['TestA'] - np.mean(
        [runs[f'student_alone_s{k}_i4']['tests']['TestA']['psnr'] for k in (0, 1)]))
    # MetaKD (late) - frozen, the frozen control being the fast-regressor row
    mf = e4['meta_minus_frozen']['metakd_late']['TestA']
    assert mf['n'] == 2
    # the late start: meta steps only after half of each run (start 2 of 4, 4 of 8; every 2)
    assert runs['metakd_late_s0_i4']['meta_iters'] == 1 and runs['metakd_late_s0_i8']['meta_iters'] == 2
    md = (out / 'lengths.md').read_text()
    assert '**8 iterations**' in md and 'frozen (= fitnet_out_fastreg by construction)' in md
    # the quiz images are in no training pool
    pool = json.loads(next((out / 'cache').glob('pool_*/images.json')).read_text())
    quiz = json.loads(next((out / 'cache').glob('quiz_*/images.json')).read_text())
    assert quiz and pool and not set(pool) & set(quiz) and len(pool) + len(quiz) == 4
    # a second call reuses every run (no job trains: result files untouched)
    stamp = {p: p.stat().st_mtime_ns for p in out.glob('runs/*/result.json')}
    bl.run_lengths(lengths_config(), data_root, out, workers=0)
    assert {p: p.stat().st_mtime_ns for p in out.glob('runs/*/result.json')} == stamp


def test_quiz_meta_data_without_quiz_split_names_the_key(tmp_path, data_root):  # noqa: F811
    cfg = lengths_config()
    del cfg['data']['quiz']
    with pytest.raises(ValueError, match=r'metakd_late\.meta_data: quiz needs data\.quiz'):
        bl.run_lengths(cfg, data_root, tmp_path / 'run', workers=0, methods=['metakd_late'])


@pytest.mark.parametrize('bad, match', [({'start_fraction': 1.5}, r'start_fraction'),
                                        ({'meta_data': 'train'}, r'meta_data'),
                                        ({'start_fraction': 0.5, 'meta': {'start': 3}}, 'not both')])
def test_protocol_metakd_keys_are_checked(bad, match):
    mk = dict(lengths_config()['methods']['metakd_late'])
    mk.update(bad)
    with pytest.raises(ValueError, match=match):
        bench.method_options(mk, 'methods.x')


def test_lengths_key_is_checked(tmp_path, data_root):  # noqa: F811
    cfg = lengths_config()
    cfg['lengths'] = {4: []}
    with pytest.raises(ValueError, match=r'lengths\.4'):
        bl.run_lengths(cfg, data_root, tmp_path / 'run', workers=0)


def test_preloaded_rows_train_the_same_student(tmp_path, data_root):  # noqa: F811
    """``train.preload`` (the pool and teacher cache read into device memory once, as on the GPU)
    gives the same batches, so the same student, value for value."""
    import torch
    cfg = lengths_config()
    ctx = bench.prepare(cfg, data_root, tmp_path / 'run', None, 1)
    params = []
    for preload in (False, True):
        cfg['train']['preload'] = preload
        spec = bench.job_spec(cfg, ctx, f'fast_{preload}', 'fitnet_out_fastreg', cfg['methods']['fitnet_out_fastreg'],
                              0, 6, 1)
        assert spec['preload'] is preload
        bench.run_job(spec)
        params.append(torch.load(tmp_path / 'run' / 'runs' / f'fast_{preload}' / 'student.pth', weights_only=True))
    for k, v in params[0]['params'].items():
        assert torch.equal(v, params[1]['params'][k]), k


def test_dukd_rows_cached_upcycling_equal_compute_and_method_lengths(tmp_path, data_root):  # noqa: F811
    """DUKD rows: the upcycled teacher outputs are cached once, `equal_compute` runs fewer iterations
    (FLOPs of output KD at the column's length) and `method_lengths` narrows a row's lengths."""
    cfg = lengths_config()
    up = {'zoom_in': 1, 'zoom_out': True, 'aug_prob': 0.5}
    cfg['methods'] = dict(student_alone={}, output_kd=dict(OUTPUT_KD),
                          dukd=dict(OUTPUT_KD, upcycle_opt=up),
                          dukd_eqc=dict(OUTPUT_KD, upcycle_opt=up, equal_compute='output_kd'),
                          dukd_2step=dict(OUTPUT_KD, upcycle_opt=dict(up, steps=2)))
    cfg['method_lengths'] = {'dukd_2step': {8: [0]}}
    out = tmp_path / 'run'
    s = bl.run_lengths(cfg, data_root, out, workers=0, plot=False)
    assert len(list((out / 'cache').glob('upcycle_*/done'))) == 1
    runs = json.loads((out / 'lengths.json').read_text())['runs']
    assert {'dukd_2step_s0_i8'} == {n for n in runs if n.startswith('dukd_2step')}
    eqc, full = runs['dukd_eqc_s0_i8'], runs['dukd_s0_i8']
    assert eqc['nominal_iters'] == 8 and 1 <= eqc['iters'] < 8 and full['iters'] == 8
    for r in (eqc, full):
        assert all(k in r['stats'][-1] for k in ('l_zoom_in', 'l_zoom_out_pix', 'l_zoom_out_kd'))
    assert 'l_total_upcycle' in runs['dukd_2step_s0_i8']['stats'][-1]
    rows = {r['method']: r for r in s['lengths'][1]['rows']}
    assert rows['dukd_eqc']['iters'] == eqc['iters'] and rows['dukd']['iters'] == 8
    assert rows['dukd'][f'{s["tests"][0]}_gap'] is not None
    with pytest.raises(ValueError, match=r'method_lengths\.dukd\.5'):
        bl.run_lengths(dict(cfg, method_lengths={'dukd': {5: [0]}}), data_root, out, workers=0, plot=False)


def test_lengths_subset_narrows_rows_and_method_lengths():
    """``--lengths`` runs part of a study: each row's own lengths are cut to it, rows left empty drop out."""
    assert bl.parse_lengths(['3000:0,1', '27000']) == {3000: [0, 1], 27000: None}
    with pytest.raises(ValueError, match='ITERATIONS'):
        bl.parse_lengths(['3000:a'])
    cfg = dict(methods=dict(a={}, b={}, c={}), lengths={3000: [0, 1], 27000: [0, 1]},
               method_lengths=dict(b={3000: [0, 1], 27000: [0]}, c={27000: [1]}))
    lengths = bl.narrow_lengths(cfg, bl._lengths(cfg), {3000: [1], 27000: [0]})
    assert lengths == {3000: [1], 27000: [0]}
    assert bl._method_lengths(cfg, lengths) == dict(a={3000: [1], 27000: [0]}, b={3000: [1], 27000: [0]})
    assert 'c' not in cfg['methods']  # its only run (27000, seed 1) is outside the subset
    with pytest.raises(ValueError, match='--lengths'):
        bl.narrow_lengths(dict(cfg), lengths, {9000: None})


def test_dukd_zoom_in_2_caches_two_distinct_tiles_per_patch(tmp_path, data_root):  # noqa: F811
    """``zoom_in: 2``: its own cache of two distinct tiles per pool patch with the teacher's output of
    each (the one-tile cache of the other rows is unchanged), and the batches pair each tile with
    its own teacher output."""
    import torch
    from krdistill.upcycle import Upcycler
    cfg = lengths_config()
    up = {'zoom_in': 1, 'zoom_out': True, 'aug_prob': 0.0}
    cfg['methods'] = dict(student_alone={}, dukd=dict(OUTPUT_KD, upcycle_opt=up),
                          dukd_zoom2=dict(OUTPUT_KD, upcycle_opt=dict(up, zoom_in=2)))
    cfg['lengths'] = {4: [0]}
    out = tmp_path / 'run'
    s = bl.run_lengths(cfg, data_root, out, workers=0, plot=False)
    assert len(list((out / 'cache').glob('upcycle_*/done'))) == 2
    runs = json.loads((out / 'lengths.json').read_text())['runs']
    assert runs['dukd_zoom2_s0_i4']['iters'] == 4 and 'l_zoom_in' in runs['dukd_zoom2_s0_i4']['stats'][-1]
    assert {r['method'] for r in s['lengths'][0]['rows']} == {'student_alone', 'dukd', 'dukd_zoom2'}
    ctx = bench.prepare(cfg, data_root, out, None, 1)
    assert sorted(ctx['upcycle_caches']) == [1, 2]
    spec = bench.job_spec(cfg, ctx, 'z2', 'dukd_zoom2', cfg['methods']['dukd_zoom2'], 0, 4, 1)
    assert spec['upcycle_cache'] == ctx['upcycle_caches'][2]
    batches = bench.CachedBatches(spec, torch.device('cpu'))
    assert batches.zin_tile.shape == (len(batches.hr), 2)
    assert all(a != b for a, b in batches.zin_tile)  # distinct tiles of each patch
    lq, gt, _, upd = batches.get(1, Upcycler(cfg['methods']['dukd_zoom2']['upcycle_opt'], cfg['scale']))
    assert upd.zin.shape[0] == 2 * gt.shape[0] == upd.zin_t.shape[0]
    teacher = bench.ev.load_network(bench.build_net(cfg['teacher']['network']), ctx['teacher_ckpt']).eval()
    with torch.no_grad():
        want = teacher(upd.zin)
    assert torch.allclose(upd.zin_t, want, atol=2e-2)  # fp16 rows
    # each tile is the GT patch's own: tile j of sample i is row i*2 + j
    h = gt.shape[-1] // cfg['scale']
    i, j = 1, 1
    t = int(batches.zin_tile[batches.order[0][i], j])
    r, c = divmod(t, cfg['scale'])
    assert torch.equal(upd.zin[i * 2 + j], gt[i, :, r * h:(r + 1) * h, c * h:(c + 1) * h])
