"""Out-of-the-box demo on images shipped with scikit-image (no download, 2 CPU cores).

1. Writes x2 training sub-images and held-out test images from ``skimage.data`` into
   ``datasets/krdistill_demo`` (cached).
2. Trains the option files in ``options/demo/`` in order through BasicSR's pipeline: a tiny
   teacher, the student alone, the student with KD (and MetaKD when its option file exists).
   Finished runs (``experiments/<name>/models/net_g_latest.pth``) are reused.
3. Prints a Y-PSNR/SSIM table on the held-out images (and writes it as JSON).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import krdistill  # noqa: F401  (shims and registration before basicsr)
from basicsr.archs import build_network
from basicsr.utils.options import ordered_yaml
from krdistill.evaluation import bicubic_downscale, evaluate, load_network, load_pairs, markdown_table, mod_crop
from krdistill.io import write_image

__all__ = ['SCALE', 'TRAIN_IMAGES', 'TEST_IMAGES', 'skimage_image', 'prepare_data', 'run', 'table', 'main']

SCALE = 2
# skimage.data images bundled with the package (no download). 'cat' is the same photo as
# 'chelsea', so it is not used at all.
TRAIN_IMAGES = ('astronaut', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'moon', 'brick',
                'grass', 'gravel', 'clock', 'page', 'colorwheel')
TEST_IMAGES = ('chelsea', 'camera', 'coins', 'text')
RUNS = (('teacher', 'demo_teacher_x2'), ('student alone', 'demo_student_x2'), ('KD (output)', 'demo_kd_x2'),
        ('MetaKD', 'demo_metakd_x2'))


def skimage_image(name: str) -> np.ndarray:
    """An image that scikit-image ships (no download) as uint8 BGR ``H x W x 3`` (gray replicated)."""
    from skimage import data
    img = getattr(data, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3][..., ::-1])  # RGB -> BGR, uint8


def prepare_data(root: Path, sub_size: int = 96, step: int = 64, log=print) -> Path:
    """Write the demo data set under ``root/datasets/krdistill_demo`` (skipped if present)."""
    base = root / 'datasets' / 'krdistill_demo'
    done = base / '.complete'
    if done.is_file():
        return base
    dirs = {k: base / k for k in ('train/HR_sub', f'train/LRbicx{SCALE}_sub', 'test/HR', f'test/LRbicx{SCALE}')}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in TRAIN_IMAGES:
        img = mod_crop(skimage_image(name), SCALE)
        h, w = img.shape[:2]
        for y in range(0, h - sub_size + 1, step):
            for x in range(0, w - sub_size + 1, step):
                hr = img[y:y + sub_size, x:x + sub_size]
                write_image(dirs['train/HR_sub'] / f'{name}_s{count:04d}.png', hr)
                write_image(dirs[f'train/LRbicx{SCALE}_sub'] / f'{name}_s{count:04d}.png', bicubic_downscale(hr, SCALE))
                count += 1
    for name in TEST_IMAGES:
        hr = mod_crop(skimage_image(name), SCALE)
        write_image(dirs['test/HR'] / f'{name}.png', hr)
        write_image(dirs[f'test/LRbicx{SCALE}'] / f'{name}.png', bicubic_downscale(hr, SCALE))
    done.write_text(f'{count} training sub-images, {len(TEST_IMAGES)} test images\n')
    log(f'demo data: {count} training sub-images ({sub_size}px) from {len(TRAIN_IMAGES)} skimage images, '
        f'{len(TEST_IMAGES)} held-out test images -> {base}')
    return base


def load_option(path: Path) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def _run_option(opt_path: Path, root: Path, total_iter: int | None) -> Path:
    """Train one option file (optionally with fewer iterations); returns the latest student checkpoint."""
    from krdistill.train import main as train_main
    opt = load_option(opt_path)
    latest = root / 'experiments' / opt['name'] / 'models' / 'net_g_latest.pth'
    if latest.is_file():
        return latest
    if total_iter is not None:  # quick mode (tests): same configs, fewer iterations
        opt = copy.deepcopy(opt)
        opt['train']['total_iter'] = total_iter
        sched = opt['train']['scheduler']
        if 'periods' in sched:
            sched['periods'] = [total_iter]
        opt['logger']['save_checkpoint_freq'] = max(total_iter, 1)
        opt['logger']['print_freq'] = max(total_iter // 2, 1)
        opt_path = root / 'experiments' / f'{opt["name"]}_quick.yml'
        opt_path.parent.mkdir(parents=True, exist_ok=True)
        opt_path.write_text(yaml.safe_dump(json.loads(json.dumps(opt)), sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)  # BasicSR resolves relative dataroots and model paths against the working folder
    try:
        train_main(['-opt', str(opt_path)], root_path=str(root))
    finally:
        os.chdir(cwd)
    if not latest.is_file():
        raise RuntimeError(f'training {opt_path} finished without writing {latest}')
    return latest


def _load_student(opt_path: Path, ckpt: Path) -> torch.nn.Module:
    opt = load_option(opt_path)
    return load_network(build_network(copy.deepcopy(opt['network_g'])), ckpt, 'params')


def run(root: Path, options_dir: Path, total_iter: int | None = None, log=print) -> dict:
    """Prepare data, train every demo run, evaluate; returns the results dict."""
    root, options_dir = Path(root).resolve(), Path(options_dir).resolve()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    base = prepare_data(root, log=log)
    pairs = load_pairs(base / 'test' / 'HR', SCALE, base / 'test' / f'LRbicx{SCALE}')
    runs = [(label, options_dir / f'{name}.yml') for label, name in RUNS if (options_dir / f'{name}.yml').is_file()]
    results = {'bicubic': evaluate(None, pairs, SCALE)}
    results['bicubic']['params'] = 0
    t_start = time.time()
    for i, (label, opt_path) in enumerate(runs, 1):
        t0 = time.time()
        log(f'[demo {i}/{len(runs)}] {label}: {opt_path.name} (elapsed {time.time() - t_start:.0f} s)')
        ckpt = _run_option(opt_path, root, total_iter)
        net = _load_student(opt_path, ckpt)
        res = evaluate(net, pairs, SCALE)
        res['params'] = sum(p.numel() for p in net.parameters())
        res['train_seconds'] = round(time.time() - t0, 1)
        results[label] = res
        log(f'[demo {i}/{len(runs)}] {label}: Y-PSNR {res["psnr"]:.2f} dB, SSIM {res["ssim"]:.4f}')
    out = root / 'results' / 'krdistill_demo'
    out.mkdir(parents=True, exist_ok=True)
    (out / 'demo_results.json').write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    rows = [(k, f'{v["psnr"]:.2f}', f'{v["ssim"]:.4f}', f'{v["params"]:,}' if v['params'] else '-')
            for k, v in results.items()]
    return markdown_table(['method', f'Y-PSNR (dB), x{SCALE}', 'Y-SSIM', 'params'], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', default='.', help='folder for datasets/, experiments/, results/ (default: .)')
    parser.add_argument('--options', default=None, help='folder of the demo option files (default: options/demo '
                        'of this checkout)')
    parser.add_argument('--total-iter', type=int, default=None, help='override iterations (quick check)')
    args = parser.parse_args(argv)
    options_dir = Path(args.options) if args.options else Path(__file__).resolve().parents[2] / 'options' / 'demo'
    if not options_dir.is_dir():
        raise SystemExit(f'--options: no such folder {options_dir}; run from a krdistill checkout or pass --options')
    t0 = time.time()
    results = run(Path(args.root), options_dir, args.total_iter)
    print(f'\nHeld-out images from skimage.data ({", ".join(TEST_IMAGES)}), x{SCALE}, Y channel, border {SCALE}:\n')
    print(table(results))
    print(f'\nTotal time {time.time() - t0:.0f} s. JSON: {Path(args.root) / "results/krdistill_demo/demo_results.json"}')


if __name__ == '__main__':
    main()
