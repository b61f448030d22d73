#!/usr/bin/env python
"""GAN-KD protocol: a GAN teacher, then a GAN-trained student with and without distillation.

Every training stage is a BasicSR option file run by ``krdistill-train`` (the code users run): BasicSR's
own ``SRModel`` / ``SRGANModel`` for the teacher and the student alone, krdistill's ``KDSRGANModel`` /
``MetaKDSRGANModel`` for the distilled rows. No perceptual loss (its VGG weights cannot be downloaded
here): pixel L1 + GAN.

``pipeline`` (config): ``paired`` (default; bicubic LR/HR pairs; CPU or GPU) or ``realesrgan``: BasicSR's
``RealESRNetModel`` / ``RealESRGANModel`` and krdistill's ``KDRealESRGANModel``, the LR synthesised in
``feed_data`` with Real-ESRGAN's second-order degradations (``degradation:``), GT crops USM-sharpened as
configured; BasicSR 1.4.2 calls ``.cuda()`` there, so ``--device cuda`` only (the tests stub it). With
``realesrgan`` the teacher's PSNR stage always runs: it fine-tunes ``--teacher`` on the degradations.
The GPU entry is ``tools/gpu_gan_protocol.py`` (a deadline, planned iterations, ``options/bench/gpu_gan_x4.yml``).

Stages (each skipped when its ``net_g_latest.pth`` exists, so a second call resumes the protocol):

1. teacher, PSNR stage: ``--teacher`` (a trained PSNR checkpoint, e.g. the shipped CPU EDSR) or
   ``teacher.l1`` iterations of L1 here. A previous attempt trained this stage too briefly and got a
   14-15 dB teacher, so:
2. teacher, GAN stage (``teacher.gan``), then a check: the GAN teacher must beat bicubic on the
   first test set by ``teacher.min_gain_db`` (Y-PSNR), else the protocol stops (``--smoke`` only warns);
3. student, PSNR stage (``train.l1``, L1, once per seed; shared by every row of that seed);
4. student, GAN stage (``train.gan``) per method of ``methods`` and seed, from the same stage-3 weights
   and the same seed (same discriminator init and batches).

Reported (``results.json``, ``results.md``): Y-PSNR/SSIM (BasicSR metrics, border = scale), NIQE
(``basicsr.metrics.calculate_niqe``, its parameters ship in the package), Y-PSNR to the teacher's output,
mean and standard deviation over seeds, the paired difference to the student alone and the number of
seeds that difference needs (``n >= (2 sd_diff / |mean_diff|)^2``, a two-sided 95% paired test), and
``gan_crops.png``: HR / teacher / student alone / distilled student on the same textured region.

Example (not run by the tests; they only smoke-test it with ``--smoke``)::

    python tools/gan_protocol.py -opt options/bench/cpu_gan_x4.yml --data-root ../shared/data \\
        --teacher ../shared/models/EDSR_f64b16_x4_T91BSD200_cpu.pth --out experiments/gan_cpu_x4
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tools/ (krbench) and the checkout (krdistill)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import krdistill  # noqa: E402,F401  (shims and registration before basicsr)
from krdistill import evaluation as ev  # noqa: E402
from krdistill.io import list_images, read_image, write_image  # noqa: E402

SMOKE = dict(train_images=4, iters=3, batch=2, gt_size=64, seeds=[0], tests=1)

#: the BasicSR model of each stage, per ``pipeline``: ``paired`` (bicubic LR/HR pairs, CPU or GPU) or
#: ``realesrgan`` (Real-ESRGAN's second-order degradations synthesised in ``feed_data``; BasicSR 1.4.2's
#: Real-ESRGAN models call ``.cuda()``, so GPU only)
MODEL_TYPES = {
    'paired': dict(l1='SRModel', gan='SRGANModel', kd='KDSRGANModel', meta='MetaKDSRGANModel'),
    'realesrgan': dict(l1='RealESRNetModel_basicsr', gan='RealESRGANModel_basicsr', kd='KDRealESRGANModel',
                       meta='MetaKDRealESRGANModel'),
}


def load_protocol(path) -> dict:
    from krbench.benchmark import load_config, method_options
    cfg = load_config(path)
    for key in ('teacher', 'gan', 'kd'):
        if key not in cfg:
            raise KeyError(f'{path}: missing top-level key {key!r}')
    pipeline = cfg.setdefault('pipeline', 'paired')
    if pipeline not in MODEL_TYPES:
        raise KeyError(f'{path}: pipeline: {pipeline!r} is not one of {sorted(MODEL_TYPES)}')
    if pipeline == 'realesrgan' and not {'model', 'dataset'} <= set(cfg.get('degradation') or {}):
        raise KeyError(f'{path}: pipeline realesrgan needs degradation.model (the top-level keys of BasicSR\'s '
                       'Real-ESRGAN models) and degradation.dataset (RealESRGANDataset\'s kernel options)')
    if cfg['teacher'].get('low_gain', 'stop') not in ('stop', 'warn'):
        raise KeyError(f'{path}: teacher.low_gain: stop or warn, not {cfg["teacher"]["low_gain"]!r}')
    for name, m in cfg['methods'].items():
        method_options(m, f'{path}: methods.{name}')
    return cfg


def smoke_config(cfg: dict, settings: dict) -> dict:
    """``cfg`` cut down by ``settings`` (keys of :data:`SMOKE`; those absent keep the config's value)."""
    cfg = copy.deepcopy(cfg)
    if 'gt_size' in settings:
        cfg['pool']['gt_size'] = settings['gt_size']
    for stage in (cfg['teacher']['l1'], cfg['teacher']['gan'], cfg['train']['l1'], cfg['train']['gan']):
        stage.update({k: settings[k] for k in ('iters', 'batch') if k in settings})
    if 'seeds' in settings:
        cfg['train']['seeds'] = list(settings['seeds'])
    if 'tests' in settings:
        cfg['data']['test'] = dict(list(cfg['data']['test'].items())[:settings['tests']])
        if cfg['data'].get('crops') not in cfg['data']['test']:
            cfg['data']['crops'] = next(iter(cfg['data']['test']))
    return cfg


# ------------------------------------------------------------------------------------------ data
def prepare_data(cfg: dict, data_root: Path, out: Path, limit: int | None) -> Path:
    """Pipeline ``paired``: the training HR (mod-cropped) and their MATLAB-bicubic LR under
    ``out/data/{HR,LR}``. Pipeline ``realesrgan``: the training HR as they are (the LR is synthesised
    in training) under ``out/data/GT``, listed in ``out/data/meta_info.txt``."""
    folder = out / 'data'
    if (folder / 'done').is_file():
        return folder
    scale = cfg['scale']
    exclude = {str(Path(e)) for e in cfg['data'].get('exclude', [])}
    paths = [p for f in cfg['data']['train_hr'] for p in list_images(data_root / f)
             if str(p.relative_to(data_root)) not in exclude]
    paths = paths[:limit] if limit else paths
    if cfg.get('pipeline') == 'realesrgan':  # RealESRGANDataset pads or crops every image to 400 px itself
        if not paths:
            raise FileNotFoundError(f'data.train_hr: no training image under {data_root}')
        names = [f'{p.parent.parent.name}_{p.name}' for p in paths]
        (folder / 'GT').mkdir(parents=True, exist_ok=True)
        for p, name in zip(paths, names):
            shutil.copyfile(p, folder / 'GT' / name)
        (folder / 'meta_info.txt').write_text(''.join(f'{n}\n' for n in names))
        (folder / 'done').write_text(str(len(names)))
        return folder
    gt_size = cfg['pool']['gt_size']
    n = 0
    for p in paths:
        hr = ev.mod_crop(read_image(p), scale)
        if min(hr.shape[:2]) < gt_size:
            continue
        write_image(folder / 'HR' / f'{p.parent.parent.name}_{p.stem}.png', hr)
        write_image(folder / 'LR' / f'{p.parent.parent.name}_{p.stem}.png', ev.bicubic_downscale(hr, scale))
        n += 1
    if n == 0:
        raise FileNotFoundError(f'data.train_hr: no training image of at least {gt_size} px under {data_root}')
    (folder / 'done').write_text(str(n))
    return folder


# ------------------------------------------------------------------------------------------ stages
def stage_opt(cfg: dict, name: str, data: Path, network_g: dict, stage: dict, seed: int, *, gan: bool,
              model_type: str, pretrain: str | None = None, teacher: str | None = None,
              kd_blocks: dict | None = None, device: str = 'cpu') -> dict:
    """The BasicSR option dict of one training stage."""
    loader = dict(use_shuffle=True, num_worker_per_gpu=int(cfg['pool'].get('workers', 0)),
                  batch_size_per_gpu=stage['batch'], dataset_enlarge_ratio=100, prefetch_mode=None)
    if cfg.get('pipeline') == 'realesrgan':
        train_ds = dict(name='train', type='RealESRGANDataset_basicsr', dataroot_gt=str(data / 'GT'),
                        meta_info=str(data / 'meta_info.txt'), io_backend=dict(type='disk'),
                        **copy.deepcopy(cfg['degradation']['dataset']), gt_size=cfg['pool']['gt_size'],
                        use_hflip=True, use_rot=False, check_images=False, **loader)
    else:
        train_ds = dict(name='train', type='CheckedPairedImageDataset', dataroot_gt=str(data / 'HR'),
                        dataroot_lq=str(data / 'LR'), io_backend=dict(type='disk'), gt_size=cfg['pool']['gt_size'],
                        use_hflip=True, use_rot=True, **loader)
    iters = int(stage['iters'])
    train = dict(optim_g=dict(type='Adam', lr=stage['lr'], betas=[0.9, 0.99]),
                 scheduler=dict(type='CosineAnnealingRestartLR', periods=[iters], restart_weights=[1],
                                eta_min=1e-7),
                 total_iter=iters, warmup_iter=-1,
                 pixel_opt=dict(type='L1Loss', loss_weight=float(cfg['gan'].get('pixel_weight', 1.0)) if gan else 1.0,
                                reduction='mean'))
    opt = dict(name=name, model_type=model_type, scale=cfg['scale'], num_gpu=0 if device == 'cpu' else 1,
               manual_seed=seed, datasets=dict(train=train_ds), network_g=copy.deepcopy(network_g),
               path=dict(pretrain_network_g=pretrain, strict_load_g=True, resume_state=None),
               train=train, logger=dict(print_freq=max(1, iters // 10), save_checkpoint_freq=10 ** 9,
                                        use_tb_logger=False))
    if cfg.get('pipeline') == 'realesrgan':  # the top-level keys feed_data reads (second-order degradations)
        opt.update(copy.deepcopy(cfg['degradation']['model']), gt_size=cfg['pool']['gt_size'],
                   queue_size=stage['batch'] * int(cfg['degradation'].get('queue_batches', 8)))
    if gan:
        opt['network_d'] = copy.deepcopy(cfg['gan']['network_d'])
        train.update(optim_d=dict(type='Adam', lr=stage['lr'], betas=[0.9, 0.99]), net_d_iters=1, net_d_init_iters=0,
                     ema_decay=0, gan_opt=dict(type='GANLoss', gan_type='vanilla', real_label_val=1.0,
                                               fake_label_val=0.0, loss_weight=float(cfg['gan']['gan_weight'])))
    if teacher is not None:
        opt['network_t'] = copy.deepcopy(cfg['teacher']['network'])
        opt['path'].update(pretrain_network_t=teacher, param_key_t='params', strict_load_t=True,
                           ignore_resume_networks=['network_t'])
        opt['kd'] = copy.deepcopy(cfg['kd']) if (kd_blocks or {}).get('kd_opt') or 'network_kr' in kd_blocks \
            else {'teacher_layers': [], 'student_layers': []}
        for k, v in (kd_blocks or {}).items():
            if k in ('network_kr', 'meta'):
                opt[k] = v
            elif k != 'pixel_opt':
                train[k] = v
    return opt


def run_stage(opt: dict, out: Path) -> Path:
    """Train one stage with ``krdistill-train`` unless done; returns its ``net_g_latest.pth``."""
    from krdistill.train import main as train_main
    final = out / 'experiments' / opt['name'] / 'models' / 'net_g_latest.pth'
    if final.is_file():
        return final
    yml = out / 'options' / f'{opt["name"]}.yml'
    yml.parent.mkdir(parents=True, exist_ok=True)
    yml.write_text(yaml.safe_dump(opt, sort_keys=False))
    cwd = os.getcwd()
    try:
        os.chdir(out)
        train_main(['-opt', str(yml)], root_path=str(out))
    finally:
        os.chdir(cwd)
    if not final.is_file():
        raise RuntimeError(f'{opt["name"]}: training ended without {final}')
    return final


# ------------------------------------------------------------------------------------------ evaluation
def load_net(net_opt: dict, path: Path, device: str = 'cpu') -> torch.nn.Module:
    net = ev.build_network(copy.deepcopy(net_opt))
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    net.load_state_dict(ckpt.get('params_ema', ckpt.get('params', ckpt)))
    return net.to(device).eval()


def metrics(sr: np.ndarray, hr: np.ndarray, teacher_sr: np.ndarray | None, scale: int) -> dict:
    """One image's scores: Y-PSNR/SSIM, NIQE and (given the teacher's output) Y-PSNR to the teacher."""
    from basicsr.metrics import calculate_niqe, calculate_psnr
    psnr, ssim = ev.y_psnr_ssim(sr, hr, border=scale)
    row = dict(psnr=psnr, ssim=ssim, niqe=float(calculate_niqe(sr, crop_border=scale, input_order='HWC',
                                                                convert_to='y')))
    if teacher_sr is not None:
        row['psnr_to_teacher'] = float(calculate_psnr(sr, teacher_sr, crop_border=scale, input_order='HWC',
                                                      test_y_channel=True))
    return row


def score(net, pairs: list[dict], scale: int, teacher_out: list | None, device: str = 'cpu',
          pool=None) -> tuple[dict, list]:
    """Mean scores of ``net`` (None: bicubic) over ``pairs`` and its outputs; ``pool`` (a
    ``multiprocessing`` pool) computes the per-image metrics in parallel."""
    outs = [ev.bicubic_upscale(p['lr'], scale) if net is None else ev.super_resolve(net, p['lr'], device, name=p['name'])
            for p in pairs]
    jobs = [(sr, p['hr'], None if teacher_out is None else teacher_out[i], scale)
            for i, (sr, p) in enumerate(zip(outs, pairs))]
    rows = pool.starmap(metrics, jobs) if pool is not None else [metrics(*j) for j in jobs]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, outs


def textured_window(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the ``size`` window with the most gradient energy (the most texture)."""
    g = hr.astype(np.float32).mean(-1)
    energy = np.abs(np.diff(g, axis=0))[:, :-1] + np.abs(np.diff(g, axis=1))[:-1]
    best, where = -1.0, (0, 0)
    step = max(1, size // 4)
    for y in range(0, energy.shape[0] - size + 1, step):
        for x in range(0, energy.shape[1] - size + 1, step):
            e = float(energy[y:y + size, x:x + size].sum())
            if e > best:
                best, where = e, (y, x)
    return where


def crops_picture(path: Path, hr: np.ndarray, images: dict, size: int = 96, zoom: int = 3) -> None:
    import cv2
    size = min(size, *hr.shape[:2])
    y, x = textured_window(hr, size)
    tiles = []
    for label, img in [('HR', hr)] + list(images.items()):
        tile = cv2.resize(img[y:y + size, x:x + size], (size * zoom, size * zoom), interpolation=cv2.INTER_NEAREST)
        tile = cv2.copyMakeBorder(tile, 24, 4, 4, 4, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        cv2.putText(tile, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    write_image(path, np.concatenate(tiles, axis=1))


def seeds_needed(diffs: list[float]) -> int | None:
    """Seeds a paired difference needs for a two-sided 95% test: ``(2 sd / |mean|)^2``; None if unknown."""
    if len(diffs) < 2 or np.mean(diffs) == 0:
        return None
    return max(2, math.ceil((2 * float(np.std(diffs, ddof=1)) / abs(float(np.mean(diffs)))) ** 2))


# ------------------------------------------------------------------------------------------ main
def run(cfg: dict, data_root: Path, out: Path, teacher_ckpt: str | None, smoke: bool | dict,
        seeds: list[int] | None = None, device: str = 'cpu', pool=None) -> dict:
    """Every stage (finished ones reused), the scores, ``results.json``, ``results.md`` and
    ``gan_crops.png`` in ``out``. ``smoke``: True (:data:`SMOKE`) or a dict of its keys: cut-down
    settings, a low teacher only warned about. ``results['timing']``: each stage trained by this call
    (seconds), the scoring time and the number of (network, image) scores."""
    from krbench.benchmark import method_options
    data_root, out = Path(data_root).resolve(), Path(out).resolve()  # every stage runs in ``out`` (chdir)
    teacher_ckpt = str(Path(teacher_ckpt).resolve()) if teacher_ckpt else None
    # smoke: tiny settings, a check that the protocol runs end to end, not a measurement (both copy cfg)
    cfg = smoke_config(cfg, SMOKE if smoke is True else smoke) if smoke else copy.deepcopy(cfg)
    cfg.setdefault('pipeline', 'paired')
    if seeds:  # a subset of train.seeds (e.g. to report the seeds finished so far; finished stages are reused)
        unknown = sorted(set(seeds) - set(cfg['train']['seeds']))
        if unknown:
            raise SystemExit(f'error: --seeds {unknown} not in train.seeds {cfg["train"]["seeds"]}')
        cfg['train']['seeds'] = list(seeds)
    out.mkdir(parents=True, exist_ok=True)
    scale, types = cfg['scale'], MODEL_TYPES[cfg['pipeline']]
    limit = (SMOKE if smoke is True else smoke or {}).get('train_images')
    data = prepare_data(cfg, data_root, out, limit)
    timing: dict = {'stages': {}}

    def stage(name, net_opt, stage_cfg, seed, **kw):
        t = time.time()
        final = out / 'experiments' / name / 'models' / 'net_g_latest.pth'
        trained = not final.is_file()
        path = run_stage(stage_opt(cfg, name, data, net_opt, stage_cfg, seed, device=device, **kw), out)
        if trained:
            timing['stages'][name] = time.time() - t
        return path

    t_net = cfg['teacher']['network']
    if teacher_ckpt is None or cfg['pipeline'] == 'realesrgan':  # realesrgan: --teacher fine-tuned on degradations
        teacher_ckpt = str(stage('teacher_l1', t_net, cfg['teacher']['l1'], 0, gan=False, model_type=types['l1'],
                                 pretrain=teacher_ckpt))
    teacher = stage('teacher_gan', t_net, cfg['teacher']['gan'], 0, gan=True, model_type=types['gan'],
                    pretrain=teacher_ckpt)
    t = time.time()
    tests = {name: ev.load_pairs(data_root / t['hr'], scale, data_root / t['lr']) for name, t in cfg['data']['test'].items()}
    results: dict = {'teacher': {}, 'bicubic': {}, 'rows': {}}
    t_model = load_net(t_net, teacher, device)
    teacher_out = {}
    for name, pairs in tests.items():
        results['bicubic'][name], _ = score(None, pairs, scale, None, pool=pool)
        results['teacher'][name], teacher_out[name] = score(t_model, pairs, scale, None, device, pool)
    timing['score_s'], timing['scored'] = time.time() - t, 2 * sum(len(p) for p in tests.values())
    first = next(iter(tests))
    gain = results['teacher'][first]['psnr'] - results['bicubic'][first]['psnr']
    results['teacher_gain_db'] = gain
    if gain < float(cfg['teacher'].get('min_gain_db', 1.0)):
        msg = (f'the GAN teacher is only {gain:+.2f} dB over bicubic on {first} (teacher.min_gain_db: '
               f'{cfg["teacher"].get("min_gain_db", 1.0)}): train its PSNR stage longer (teacher.l1.iters) or pass '
               '--teacher with a trained checkpoint')
        if not smoke and cfg['teacher'].get('low_gain', 'stop') == 'stop':
            raise SystemExit(f'error: {msg}')
        print(f'warning: {msg}')
    s_net = cfg['student']['network']
    crop_set = cfg['data'].get('crops', first)
    crops = {'teacher': teacher_out[crop_set][0]}
    for seed in cfg['train']['seeds']:
        base = stage(f'student_l1_s{seed}', s_net, cfg['train']['l1'], seed, gan=False, model_type=types['l1'])
        for method, mcfg in cfg['methods'].items():
            blocks = method_options(mcfg, f'methods.{method}')
            kd = {k: v for k, v in blocks.items() if k != 'pixel_opt'}
            model_type = types['meta'] if 'network_kr' in kd else types['kd'] if kd else types['gan']
            final = stage(f'{method}_s{seed}', s_net, cfg['train']['gan'], seed, gan=True, model_type=model_type,
                          pretrain=str(base), teacher=str(teacher) if kd else None, kd_blocks=blocks)
            t = time.time()
            net = load_net(s_net, final, device)
            row = results['rows'].setdefault(method, {})
            for name, pairs in tests.items():
                scores, outs = score(net, pairs, scale, teacher_out[name], device, pool)
                row.setdefault(name, []).append(scores)
                if seed == cfg['train']['seeds'][0] and name == crop_set:
                    crops[method] = outs[0]
            timing['score_s'] += time.time() - t
            timing['scored'] += sum(len(p) for p in tests.values())
    crops_picture(out / 'gan_crops.png', tests[crop_set][0]['hr'], crops)
    results['timing'] = timing
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    (out / 'results.md').write_text(table(results, cfg))
    print(table(results, cfg))
    print(f'crops picture: {out / "gan_crops.png"}')
    return results


def table(results: dict, cfg: dict) -> str:
    lines = []
    base = next(iter(cfg['methods']))
    teacher = 'teacher (GAN)' if cfg.get('pipeline', 'paired') == 'paired' else 'teacher (Real-ESRGAN GAN)'
    for name in results['teacher']:
        rows = [['bicubic', *(f'{results["bicubic"][name][k]:.3f}' for k in ('psnr', 'ssim', 'niqe')), '', '', ''],
                [teacher, *(f'{results["teacher"][name][k]:.3f}' for k in ('psnr', 'ssim', 'niqe')), '', '', '']]
        for method, per_set in results['rows'].items():
            vals = per_set[name]

            def ms(k):
                xs = [v[k] for v in vals]
                return f'{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}' if len(xs) > 1 else f'{xs[0]:.3f}'
            diffs = [v['psnr'] - b['psnr'] for v, b in zip(vals, results['rows'][base][name])]
            need = seeds_needed(diffs) if method != base else None
            rows.append([method, ms('psnr'), ms('ssim'), ms('niqe'), ms('psnr_to_teacher'),
                         '' if method == base else f'{np.mean(diffs):+.3f}', '' if need is None else str(need)])
        lines.append(f'### {name} (x{cfg["scale"]}, {len(cfg["train"]["seeds"])} seed(s))\n')
        lines.append(ev.markdown_table(['row', 'PSNR-Y', 'SSIM-Y', 'NIQE', 'PSNR to teacher',
                                        f'ΔPSNR vs {base}', 'seeds needed'], rows))
        lines.append('')
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-opt', required=True, help='protocol file, e.g. options/bench/cpu_gan_x4.yml')
    p.add_argument('--data-root', required=True, help='folder holding the data.train_hr and data.test folders')
    p.add_argument('--teacher', default=None, help='a trained PSNR teacher checkpoint (its L1 stage); default: train it')
    p.add_argument('--out', required=True, help='output folder (a second call resumes)')
    p.add_argument('--seeds', type=int, nargs='+', default=None, help='a subset of train.seeds (default: all)')
    p.add_argument('--smoke', action='store_true', help='tiny settings: check that it runs (< 2 min), measure nothing')
    p.add_argument('--device', default='cpu', help='cpu or cuda (pipeline realesrgan: cuda; BasicSR calls .cuda())')
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads()))))
    cfg = load_protocol(args.opt)
    if cfg['pipeline'] == 'realesrgan' and args.device == 'cpu':
        raise SystemExit(f'error: {args.opt}: pipeline realesrgan trains BasicSR\'s Real-ESRGAN models, which call '
                         '.cuda(): use --device cuda (on a GPU machine: tools/gpu_gan_protocol.py)')
    run(cfg, Path(args.data_root).resolve(), Path(args.out).resolve(), args.teacher, args.smoke,
        args.seeds, args.device)
    return 0


if __name__ == '__main__':
    sys.exit(main())
