"""The distillation benchmark on tiny synthetic data: tables, JSON, plots, resumability."""
import json
import os
import warnings

import cv2
import numpy as np
import pytest

import krdistill  # noqa: F401
from krbench import benchmark as bench  # tools/ (tests/conftest.py)
from krbench import methods

EDSR = dict(type='EDSR', num_in_ch=3, num_out_ch=3, upscale=2, res_scale=1, img_range=255.,
            rgb_mean=[0.4488, 0.4371, 0.4040])


def _image(rng, h, w):
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(x / rng.uniform(2, 6) + c) * np.cos(y / rng.uniform(2, 6)) for c in range(3)], 2)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def data_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    for folder, n, size in (('Train/HR', 4, 40), ('TestA/HR', 2, 24), ('TestB/HR', 1, 26)):
        os.makedirs(root / folder)
        for i in range(n):
            cv2.imwrite(str(root / folder / f'im{i}.png'), _image(rng, size, size + 2 * i))
    cv2.imwrite(str(root / 'Train/HR/skip.png'), _image(rng, 30, 30))
    return root


OUTPUT_KD = {'output_kd_opt': {'type': 'OutputKDLoss', 'loss_weight': 1.0}}
FITNET = {'type': 'FitNetLoss', 'loss_weight': 1.0}


def tiny_config():
    meta = dict(network_kr=dict(type='KRNet', num_kernels=2, hidden=4),
                texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0), optim_kr=dict(lr=1e-3),
                meta=dict(every=2, mode='exact'))
    return dict(
        scale=2,
        data=dict(train_hr=['Train/HR'], exclude=['Train/HR/skip.png'],
                  test=dict(TestA=dict(hr='TestA/HR'), TestB=dict(hr='TestB/HR')), val='TestA'),
        pool=dict(size=24, gt_size=12, seed=0),
        teacher=dict(checkpoint=None, network=dict(EDSR, num_feat=8, num_block=2),
                     train=dict(iters=3, lr=1e-3, seed=0)),
        student=dict(network=dict(EDSR, num_feat=4, num_block=1)),
        train=dict(iters=4, iters_step=2, min_iters=2, batch=4, lr=1e-3, betas=[0.9, 0.99], seeds=[0, 1],
                   val_every=2, log_every=2),
        kd=dict(teacher_layers=['body.1'], student_layers=['body.0']),
        methods=dict(student_alone={}, output_kd=dict(OUTPUT_KD),
                     fitnet={'kd_opt': {'type': 'FitNetLoss', 'loss_weight': 1.0}}, metakd_exact=meta),
        ablations=dict(seed=0, iters_fraction=0.5, variants=dict(static_kernels=dict(method='metakd_exact',
                                                                                    network_kr=dict(dynamic=False)))),
        visual=dict(crop=8),
        measure=dict(iters=2, meta_steps=1),
        budget=dict(minutes=1000, workers=0, threads=1),
    )


def test_benchmark_tiny_run_and_resume(tmp_path, data_root, capsys):
    out = tmp_path / 'run'
    res = bench.run(tiny_config(), data_root, out)
    for name in ('results.md', 'results.json', 'curves.png', 'visual.png', 'plan.json', 'teacher/teacher.pth'):
        assert (out / name).is_file(), name
    md = (out / 'results.md').read_text()
    for label in ('bicubic', 'teacher', 'student alone', 'output KD', 'FitNet', 'MetaKD (exact)', 'Ablations'):
        assert label in md
    data = json.loads((out / 'results.json').read_text())
    rows = {r['method']: r for r in data['summary']['rows']}
    assert rows['fitnet']['TestA_psnr']['n'] == 2 and rows['fitnet']['seeds'] == [0, 1]
    assert np.isfinite(rows['metakd_exact']['TestB_psnr']['mean'])
    assert set(data['summary']['paired']) == {'output_kd', 'fitnet', 'metakd_exact'}
    assert len(data['runs']) == 4 * 2 + 1
    # MetaKD runs keep their KRNets and draw what they transfer, with the weights over training
    import cv2
    pic = cv2.imread(str(out / 'runs' / 'metakd_exact_s0_i4' / 'kr.png'))
    assert (out / 'runs' / 'metakd_exact_s0_i4' / 'krnets.pth').is_file() and pic is not None
    assert pic.shape[1] >= 2 * 96 and pic.shape[0] >= 5 * 96  # 2 kernels; kernel, 3 map and history rows
    assert not (out / 'runs' / 'fitnet_s0_i4' / 'kr.png').exists()
    # same seed -> same init and batch order: the student-alone runs of two calls agree (checked below)
    run_files = sorted(out.glob('runs/*/result.json'))
    assert len(run_files) == 9
    mtimes = {p: p.stat().st_mtime_ns for p in run_files}
    calls = []
    orig = bench.run_job

    def counting(spec):
        calls.append(spec['name'])
        return orig(spec)

    bench.run_job = counting
    try:
        res2 = bench.run(tiny_config(), data_root, out)
    finally:
        bench.run_job = orig
    assert {p: p.stat().st_mtime_ns for p in run_files} == mtimes  # nothing retrained
    assert all(not (out / 'runs' / c).exists() or (out / 'runs' / c / 'result.json') in mtimes for c in calls)
    assert res2['summary']['rows'] == res['summary']['rows']
    assert 'reused, not retrained' in capsys.readouterr().out


def test_same_seed_same_student_alone(tmp_path, data_root):
    cfg = tiny_config()
    cfg['methods'] = {'student_alone': {}}
    cfg['ablations'] = None
    cfg['train']['seeds'] = [0]
    a = bench.run(cfg, data_root, tmp_path / 'a', plot=False)
    b = bench.run(cfg, data_root, tmp_path / 'b', teacher_ckpt=str(tmp_path / 'a' / 'teacher' / 'teacher.pth'),
                  plot=False)
    ra, rb = list(a['runs'].values())[0], list(b['runs'].values())[0]
    assert ra['tests']['TestA']['psnr'] == rb['tests']['TestA']['psnr']


def test_plan_fits_budget():
    cfg = tiny_config()
    cfg['train'].update(iters=1000, iters_step=100, min_iters=100)
    cfg['budget'].update(minutes=1.0, workers=2)
    meas = {m: dict(t_step=0.01, t_meta=0.03) for m in cfg['methods']}
    meas['abl_static_kernels'] = dict(t_step=0.01, t_meta=0.03)
    plan = bench.make_plan(cfg, meas, overhead_s=0.0)
    assert plan['predicted_train_s'] <= 60
    assert plan['iters'] < 1000 and plan['iters'] % 100 == 0
    full = bench.make_plan(dict(cfg, budget=dict(minutes=1000, workers=2)), meas, 0.0)
    assert full['iters'] == 1000


# ---------------------------------------------------------------------------- the shipped algorithms
def _equivalence_config():
    cfg = tiny_config()
    meta = cfg['methods']['metakd_exact']
    cfg['methods'] = {'metakd_exact': dict(OUTPUT_KD, **meta),
                      'fitnet_out': dict(OUTPUT_KD, kd_opt=dict(FITNET)),
                      'fitnet_fastreg': dict(OUTPUT_KD, kd_opt=dict(FITNET),
                                             optim_kd={'lr': 5e-2, 'betas': [0.5, 0.9]})}
    cfg['ablations'] = None
    cfg['train'].update(seeds=[0], iters=4, min_iters=4, log_every=1)
    return cfg


def _plain_loop(out, cfg, method, seed=0):
    """The benchmark's training of ``method`` written as a user's plain loop: the builders, the
    optimizers and ``train_step`` with the teacher outputs of the benchmark's cache."""
    import torch
    from basicsr.archs import build_network
    from krdistill.build import build_distiller, build_metakd, build_optimizer
    tr, kd = cfg['train'], cfg['kd']
    pool = next((out / 'cache').glob('pool_*'))
    tcache = next((out / 'cache').glob('teacher_*'))
    hr_f, lr_f = bench.RowFile(pool / 'pool_hr.bin'), bench.RowFile(pool / 'pool_lr.bin')
    out_f, feat_f = bench.RowFile(tcache / 'out_t.bin'), bench.RowFile(tcache / 'feat_body.1.bin')
    order = bench.batch_order(len(hr_f), tr['iters'], tr['batch'], seed)
    torch.manual_seed(seed)
    student = build_network(dict(cfg['student']['network']))
    teacher = build_network(dict(cfg['teacher']['network']))
    torch.manual_seed(seed + 7919)  # the benchmark's seed for the training-only modules
    opt_kr = None
    if method == 'metakd_exact':
        algo = build_metakd(teacher, student, kd['teacher_layers'], kd['student_layers'],
                            network_kr=dict(type='KRNet', num_kernels=2, hidden=4),
                            texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                            output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                            pixel_opt=dict(type='L1Loss', loss_weight=1.0), meta=dict(every=2, mode='exact'))
        opt_kr = build_optimizer(dict(type='Adam', lr=1e-3), algo.kr_parameters())
    else:
        algo = build_distiller(teacher, student, kd['teacher_layers'], kd['student_layers'],
                               kd_opt=dict(type='FitNetLoss', loss_weight=1.0),
                               output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                               pixel_opt=dict(type='L1Loss', loss_weight=1.0))
    reg = dict(lr=5e-2, betas=(0.5, 0.9)) if method == 'fitnet_fastreg' else {}
    opt = torch.optim.Adam([dict(params=list(student.parameters())), dict(params=algo.kd_parameters(), **reg)],
                           lr=tr['lr'], betas=tuple(tr['betas']))
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=tr['iters']) for o in (opt, opt_kr) if o]
    logs = []
    for it in range(1, tr['iters'] + 1):
        idx = order[it - 1]
        lq, gt = bench.to_float(lr_f.take(idx)), bench.to_float(hr_f.take(idx))
        teacher_out = (torch.from_numpy(out_f.take(idx)).float(), [torch.from_numpy(feat_f.take(idx)).float()])
        if opt_kr is not None:
            step = algo.train_step(lq, gt, opt, opt_kr, teacher=teacher_out, it=it)
        else:
            step = algo.train_step(lq, gt, opt, teacher=teacher_out, it=it)
        assert step.skipped is None
        with warnings.catch_warnings():  # no KRNet step at a non-meta iteration: its schedule still advances
            warnings.simplefilter('ignore', UserWarning)
            for s in scheds:
                s.step()
        logs.append({k: float(v) for k, v in step.logs.items() if k != 't_meta'})
    return logs


def test_benchmark_jobs_equal_plain_loops_of_the_builders(tmp_path, data_root):
    """A benchmark MetaKD job (meta iterations 2 and 4: the meta batch is the previous batch) and a
    hand-crafted one (FitNet + output KD) give the losses of a plain loop over the builders."""
    cfg = _equivalence_config()
    out = tmp_path / 'run'
    res = bench.run(cfg, data_root, out, plot=False)
    runs = {}
    for method in ('metakd_exact', 'fitnet_out', 'fitnet_fastreg'):
        run = runs[method] = next(r for r in res['runs'].values() if r['method'] == method)
        assert run['skipped_steps'] == 0
        got, want = run['stats'], _plain_loop(out, cfg, method)
        assert [row['it'] for row in got] == [1, 2, 3, 4]
        assert [sorted(k for k in g if k.startswith('l_')) for g in got] == \
            [sorted(k for k in w if k.startswith('l_')) for w in want], method
        if method == 'metakd_exact':
            assert ['l_meta' in w for w in want] == [False, True, False, True]
            assert {'l_pix', 'l_texture', 'l_kd_out'} <= set(want[0])
            assert run['meta_steps'] == 2 and run['s_per_meta_step'] > 0
        else:
            assert {'l_pix', 'l_kd_fitnet', 'l_kd_out'} <= set(want[0])
        for it, (g, w) in enumerate(zip(got, want), 1):
            for k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), (method, it, k)
    # optim_kd: the regressor's own lr and betas change the run from iteration 2 on
    fast, slow = runs['fitnet_fastreg']['stats'], runs['fitnet_out']['stats']
    assert fast[0]['l_total'] == pytest.approx(slow[0]['l_total'], rel=1e-6)
    assert abs(fast[3]['l_kd_fitnet'] - slow[3]['l_kd_fitnet']) > 1e-4


def test_non_finite_steps_are_skipped_and_counted(tmp_path, data_root):
    cfg = _equivalence_config()
    cfg['methods'] = {'output_kd': dict(OUTPUT_KD)}
    out = tmp_path / 'run'
    first = bench.run(cfg, data_root, out, plot=False)
    assert list(first['runs'].values())[0]['skipped_steps'] == 0
    # a teacher cache holding NaN outputs: no step is taken, every one is counted
    tcache = next((out / 'cache').glob('teacher_*'))
    meta = json.loads((tcache / 'out_t.bin.json').read_text())
    np.full(meta['shape'], np.nan, np.float16).tofile(tcache / 'out_t.bin')
    for p in out.glob('runs/*/result.json'):
        p.unlink()
    run = list(bench.run(cfg, data_root, out, plot=False)['runs'].values())[0]
    assert run['skipped_steps'] == cfg['train']['iters']
    assert [s['it'] for s in run['skipped']] == [1, 2, 3, 4]
    assert 'non-finite student loss (l_kd_out)' in run['skipped'][0]['why']
    assert json.loads(next(out.glob('runs/*/result.json')).read_text())['skipped_steps'] == 4


def test_method_blocks_are_the_option_blocks():
    assert bench.method_options({}) == {'pixel_opt': bench.PIXEL_OPT}
    opts = bench.method_options({'output_kd_opt': {'type': 'OutputKDLoss', 'loss_weight': 0.5},
                                 'network_kr': {'type': 'KRNet', 'num_kernels': 4},
                                 'texture_opt': {'type': 'TextureWiseLoss', 'loss_weight': 2.0,
                                                 'criterion': 'charbonnier'},
                                 'optim_kr': {'lr': '1e-2'}, 'meta': {'every': 4}, 'start_fraction': 0.5})
    assert opts['output_kd_opt'] == {'type': 'OutputKDLoss', 'loss_weight': 0.5}
    assert opts['network_kr'] == {'type': 'KRNet', 'num_kernels': 4}
    assert opts['texture_opt'] == {'type': 'TextureWiseLoss', 'loss_weight': 2.0, 'criterion': 'charbonnier'}
    assert opts['optim_kr'] == {'type': 'Adam', 'lr': 1e-2, 'betas': [0.9, 0.999]} and opts['meta'] == {'every': 4}
    assert 'start_fraction' not in opts  # a protocol key, not a builder block
    assert bench.method_options({'kd_opt': {'type': 'ATLoss', 'loss_weight': 500}})['kd_opt'] == {
        'type': 'ATLoss', 'loss_weight': 500}
    with pytest.raises(ValueError, match=r'methods\.x\.optim_kd: .*needs methods\.x\.kd_opt'):
        bench.method_options({'optim_kd': {'lr': 1e-2}}, 'methods.x')
    with pytest.raises(ValueError, match=r'methods\.x\.optim_kd'):
        bench.method_options({'kd_opt': dict(FITNET), 'optim_kd': {'lr': 1e-2, 'eps': 1}}, 'methods.x')
    with pytest.raises(KeyError, match=r'methods\.x: unknown key\(s\) \[.pairs.\]'):
        bench.method_options({'pairs': {}}, 'methods.x')
    with pytest.raises(ValueError, match=r'methods\.x\.network_kr\.type: missing'):
        bench.method_options({'network_kr': {'num_kernels': 4}}, 'methods.x')
    with pytest.raises(ValueError, match=r'methods\.x\.meta: a MetaKD key; needs methods\.x\.network_kr'):
        bench.method_options({'meta': {'every': 4}}, 'methods.x')
    with pytest.raises(ValueError, match=r'methods\.x\.equal_compute'):
        bench.method_options({'network_kr': {'type': 'KRNet'}, 'equal_compute': 'output_kd'}, 'methods.x')


@pytest.mark.parametrize('key, new', [('output_kd', 'output_kd_opt'), ('pair', 'kd_opt'),
                                      ('regressor_optim', 'optim_kd'), ('upcycle', 'upcycle_opt'),
                                      ('metakd', 'network_kr')])
def test_a_key_of_the_old_vocabulary_names_its_replacement(key, new):
    with pytest.raises(KeyError, match=rf'methods\.x\.{key}: a key of the benchmark\'s old vocabulary; write {new}'):
        bench.method_options({key: {}}, 'methods.x')
    cfg = tiny_config()
    cfg['ablations']['variants']['static_kernels'] = dict(method='metakd_exact', krnet=dict(dynamic=False))
    with pytest.raises(KeyError, match=r'ablations\.variants\.v\.krnet: .*write network_kr'):
        methods.ablation_block(cfg['methods'], cfg['ablations']['variants']['static_kernels'], 'ablations.variants.v')


#: blocks of the first vocabulary as finished runs recorded them, and the same in the option-file vocabulary
LEGACY = [
    ({'output_kd': 1.0}, dict(OUTPUT_KD)),
    ({'output_kd': 1.0, 'pair': dict(FITNET), 'regressor_optim': {'lr': 1e-2, 'betas': [0.9, 0.999]},
      'upcycle': {'zoom_in': 1, 'zoom_out': True}, 'equal_compute': 'output_kd'},
     dict(OUTPUT_KD, kd_opt=dict(FITNET), optim_kd={'lr': 1e-2, 'betas': [0.9, 0.999]},
          upcycle_opt={'zoom_in': 1, 'zoom_out': True}, equal_compute='output_kd')),
    ({'output_kd': 1.0, 'metakd': {'krnet': {'num_kernels': 2}, 'texture_weight': 1.0,
                                   'texture': {'criterion': 'charbonnier', 'eps': 0.01}, 'optim_kr': {'lr': 1e-2},
                                   'meta': {'every': 16}, 'meta_data': 'quiz', 'start_fraction': 0.5}},
     dict(OUTPUT_KD, network_kr={'type': 'KRNet', 'num_kernels': 2},
          texture_opt={'type': 'TextureWiseLoss', 'loss_weight': 1.0, 'criterion': 'charbonnier', 'eps': 0.01},
          optim_kr={'lr': 1e-2}, meta={'every': 16}, meta_data='quiz', start_fraction=0.5)),
]


@pytest.mark.parametrize('old, new', LEGACY)
def test_from_legacy_trains_what_the_old_block_trained(old, new):
    assert methods.canonical(old) == methods.canonical(new)
    assert methods.from_legacy(new) == new  # a new block is left as it is
    changed = dict(new, output_kd_opt={'type': 'OutputKDLoss', 'loss_weight': 2.0})
    assert methods.canonical(old) != methods.canonical(changed)


def test_a_run_recorded_in_the_old_vocabulary_is_reused(tmp_path, data_root):
    """Finished runs whose result.json holds a block of the first vocabulary are reused by the same
    block in the option-file vocabulary (and the plan they were made under stands); a really changed
    block is retrained."""
    cfg = tiny_config()
    cfg['methods'] = {'output_kd': dict(OUTPUT_KD), 'metakd_exact': cfg['methods']['metakd_exact']}
    cfg['ablations']['variants'] = dict(frozen=dict(method='metakd_exact', meta=dict(update='frozen')))
    cfg['train'].update(seeds=[0])
    out = tmp_path / 'run'
    first = bench.run(cfg, data_root, out, plot=False)['runs']
    # rewrite what the first call recorded as the first vocabulary wrote it
    legacy_meta = {'krnet': {'num_kernels': 2, 'hidden': 4}, 'texture_weight': 1.0, 'optim_kr': {'lr': 1e-3},
                   'meta': {'every': 2, 'mode': 'exact'}}
    old_blocks = {'output_kd': {'output_kd': 1.0}, 'metakd_exact': {'metakd': legacy_meta},
                  'abl_frozen': {'metakd': dict(legacy_meta, meta={'every': 2, 'mode': 'exact', 'update': 'frozen'})}}
    for p in out.glob('runs/*/result.json'):
        r = json.loads(p.read_text())
        r['method_cfg'] = old_blocks[r['method']]
        p.write_text(json.dumps(r))
    old_cfg = json.loads((out / 'config.json').read_text())
    old_cfg['methods'] = {m: old_blocks[m] for m in cfg['methods']}
    old_cfg['ablations']['variants'] = dict(frozen=dict(method='metakd_exact', meta=dict(update='frozen')))
    plan = json.loads((out / 'plan.json').read_text())
    plan['key'] = bench._plan_key(old_cfg, out / 'teacher' / 'teacher.pth', 'cpu')
    (out / 'plan.json').write_text(json.dumps(plan))
    (out / 'config.json').write_text(json.dumps(old_cfg))
    stamp = {p: p.stat().st_mtime_ns for p in out.glob('runs/*/result.json')}
    calls = []
    orig = bench.execute

    def no_measuring(specs, workers, on_done=None):
        calls.extend(s.get('measure') is not None for s in specs)
        return orig(specs, workers, on_done)

    bench.execute = no_measuring
    try:
        again = bench.run(cfg, data_root, out, plot=False)['runs']
    finally:
        bench.execute = orig
    assert not any(calls)  # the plan stands: nothing measured again
    assert {p: p.stat().st_mtime_ns for p in out.glob('runs/*/result.json')} == stamp  # nothing retrained
    assert {n: r['tests'] for n, r in again.items()} == {n: r['tests'] for n, r in first.items()}
    cfg['methods']['output_kd'] = {'output_kd_opt': {'type': 'OutputKDLoss', 'loss_weight': 3.0}}
    changed = bench.run(cfg, data_root, out, plot=False, methods=['output_kd'], no_ablations=True)['runs']
    (run,) = changed.values()
    assert run['method_cfg'] == cfg['methods']['output_kd']
    assert run['stats'][-1]['l_kd_out'] != first[run['name']]['stats'][-1]['l_kd_out']


def test_a_changed_method_block_is_retrained_not_reused(tmp_path, data_root):
    cfg = _equivalence_config()
    cfg['methods'] = {'output_kd': dict(OUTPUT_KD)}
    out = tmp_path / 'run'
    first = list(bench.run(cfg, data_root, out, plot=False)['runs'].values())[0]
    again = list(bench.run(cfg, data_root, out, plot=False)['runs'].values())[0]
    assert again['stats'] == first['stats']  # same block: reused
    cfg['methods']['output_kd'] = {'output_kd_opt': {'type': 'OutputKDLoss', 'loss_weight': 3.0}}
    changed = list(bench.run(cfg, data_root, out, plot=False)['runs'].values())[0]
    assert changed['method_cfg'] == {'output_kd_opt': {'type': 'OutputKDLoss', 'loss_weight': 3.0}}
    assert changed['stats'][-1]['l_kd_out'] != first['stats'][-1]['l_kd_out']


def test_horizon_runs_log_the_credit_of_their_branch_weights(tmp_path, data_root):
    cfg = tiny_config()
    meta = dict(network_kr=dict(type='KRNet', num_kernels=2, hidden=4, fitnet_branch=True, texture_init=0.0,
                                learn_fitnet_weight=False),
                texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0), optim_kr=dict(lr=1e-2),
                meta=dict(every=1, mode='exact', virtual_step='optimizer', objective='horizon', horizon_stride=2))
    cfg['methods'] = dict(metakd_hz=dict(OUTPUT_KD, **meta))
    cfg['train'].update(seeds=[0], iters=12, min_iters=12)
    cfg['ablations'] = None
    bench.run(cfg, data_root, tmp_path / 'run')
    (res,) = [json.loads(p.read_text()) for p in (tmp_path / 'run').glob('runs/metakd_hz_*/result.json')]
    logged = [r for r in res['meta_log'] if 'kr0_b_tex_credit' in r]
    assert len(logged) == 2 and logged[1]['kr0_b_tex_credit_n'] == 10  # meta steps 1 and 11; 2-10 averaged
    assert all(np.isfinite(r['kr0_b_tex_credit']) and r['kr0_b_tex'] >= 0 for r in logged)
    assert 'kr0_b_fit' not in logged[0]  # b_fit is not learned here
