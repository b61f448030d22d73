"""Out-of-the-box demo on images shipped with scikit-image (no download, 2 CPU cores).

1. Writes x2 training sub-images and held-out test images from ``skimage.data`` into
   ``datasets/krdistill_demo`` (cached).
2. Trains the option files in ``options/demo/`` in order through BasicSR's pipeline: a tiny
   teacher, the student alone, the student with KD (and MetaKD when its option file exists).
   Finished runs (``experiments/<name>/models/net_g_latest.pth``) are reused.
3. Prints a Y-PSNR/SSIM table on the held-out images (and writes it as JSON) and writes
   ``results/krdistill_demo/demo_crops.png``: the same HR crop of held-out images for HR,
   bicubic and every trained network, side by side, each labelled with its PSNR on that image.

Quiet by default: one progress line per stage (data, each training run, evaluation), with an
ETA while training, updated in place on a terminal and as sparse lines otherwise. BasicSR's full
log is still written to ``experiments/<name>/train_<name>_<time>.log``; ``--verbose`` also prints it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import yaml

import krdistill  # noqa: F401  (shims and registration before basicsr)
from basicsr.archs import build_network
from krdistill.evaluation import (bicubic_downscale, bicubic_upscale, evaluate, load_network, load_pairs,
                                  markdown_table, mod_crop, super_resolve)
from krdistill.io import load_options, write_image

__all__ = ['SCALE', 'TRAIN_IMAGES', 'TEST_IMAGES', 'CROP_IMAGES', 'CROP_SIZE', 'CROP_ZOOM', 'CROP_GAP',
           'CROP_COLUMNS', 'LABEL_HEIGHT', 'RESULTS_DIR', 'CROPS_PNG', 'skimage_image', 'prepare_data', 'crop_box',
           'crops_figure', 'Console', 'run', 'table', 'main']

SCALE = 2
# skimage.data images bundled with the package (no download). 'cat' is the same photo as
# 'chelsea', so it is not used at all.
TRAIN_IMAGES = ('astronaut', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'moon', 'brick',
                'grass', 'gravel', 'clock', 'page', 'colorwheel')
TEST_IMAGES = ('chelsea', 'camera', 'coins', 'text')
RUNS = (('teacher', 'demo_teacher_x2'), ('student alone', 'demo_student_x2'), ('KD (output)', 'demo_kd_x2'),
        ('MetaKD', 'demo_metakd_x2'))
#: held-out images shown in the crops picture (one row each), the HR crop size and its display zoom
CROP_IMAGES = ('chelsea', 'camera')
CROP_SIZE = 64
CROP_ZOOM = 3
#: the crops picture's columns, left to right (those that exist); the teacher comes last
CROP_COLUMNS = ('HR', 'bicubic', 'student alone', 'KD (output)', 'MetaKD', 'teacher')
LABEL_HEIGHT = 40
CROP_GAP = 4  # dark pixels right of each cell and below each row
RESULTS_DIR = Path('results') / 'krdistill_demo'
CROPS_PNG = RESULTS_DIR / 'demo_crops.png'


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
    """An option file of ``options/``, read with krdistill's safe YAML loader (OrderedDict, as BasicSR
    reads it; a Python tag is refused)."""
    return load_options(path, 'option file')


# ------------------------------------------------------------------------------------------ console
def _seconds(s: float) -> str:
    s = int(round(s))
    return f'{s} s' if s < 100 else f'{s // 60} min {s % 60:02d} s'


class Console:
    """The demo's own output: whole lines, and status lines that a terminal rewrites in place.

    ``write_line`` (a callable taking one line) makes a non-terminal console that writes through it.
    On a non-terminal, a status line is written only when it is a ``milestone`` (sparse lines).
    """

    def __init__(self, stream=None, tty: bool | None = None, write_line: Callable[[str], None] | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.write_line = write_line
        if tty is None:
            tty = write_line is None and bool(getattr(self.stream, 'isatty', lambda: False)())
        self.tty = tty
        self._shown = 0  # length of the status line on screen (terminal)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str) -> None:
        if self.write_line is not None:
            self.write_line(text)
        elif self.tty and self._shown:
            self._write('\r' + text.ljust(self._shown) + '\n')
        else:
            self._write(text + '\n')
        self._shown = 0

    def status(self, text: str, milestone: bool = False) -> None:
        if self.tty and self.write_line is None:
            self._write('\r' + text.ljust(self._shown))
            self._shown = max(self._shown, len(text))
        elif milestone:
            self.line(text)


class _TrainingProgress:
    """One training stage's status line, fed by BasicSR's own log lines (``[epoch: .., iter: N, ..]``)."""

    _ITER = re.compile(r'\biter:\s*([\d,]+)')

    def __init__(self, console: Console, prefix: str, total_iter: int):
        self.console, self.prefix, self.total = console, prefix, int(total_iter)
        self.t0 = self.t_train = time.time()
        self.start_iter = 0
        self.iter = 0
        self._quarter = 0
        console.status(f'{prefix}: setting up', milestone=False)

    def log_line(self, line: str) -> None:
        if 'Start training from epoch' in line or 'Resuming training from epoch' in line:
            m = self._ITER.search(line)
            self.t_train, self.start_iter = time.time(), int(m.group(1).replace(',', '')) if m else 0
            self.iter = self.start_iter
            self.console.status(f'{self.prefix}: iter {self.iter}/{self.total}, '
                                f'{_seconds(time.time() - self.t0)} elapsed')
            return
        if '[epoch:' not in line:
            return
        m = self._ITER.search(line)
        if m:
            self.update(int(m.group(1).replace(',', '')))

    def update(self, it: int) -> None:
        self.iter = it
        now = time.time()
        done = max(it - self.start_iter, 1)
        eta = (now - self.t_train) / done * max(self.total - it, 0)
        quarter = 4 * it // max(self.total, 1)
        milestone = quarter > self._quarter and it < self.total
        self._quarter = max(self._quarter, quarter)
        self.console.status(f'{self.prefix}: iter {it}/{self.total}, {_seconds(now - self.t0)} elapsed, '
                            f'ETA {_seconds(eta)}', milestone=milestone)


class _ConsoleCapture(io.TextIOBase):
    """Stands in for stdout and stderr during one BasicSR run: BasicSR's console handler (made by
    ``get_root_logger`` inside the run, on the ``sys.stderr`` of that moment) writes here, each
    complete line goes to ``on_line``, the last lines are kept for an error report, and with
    ``forward`` everything is also passed on (``--verbose``)."""

    def __init__(self, on_line: Callable[[str], None], forward=None, keep: int = 60):
        super().__init__()
        self.on_line, self.forward = on_line, forward
        self.tail: collections.deque = collections.deque(maxlen=keep)
        self._buf = ''

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if self.forward is not None:
            self.forward.write(s)
        self._buf += s
        *lines, self._buf = self._buf.split('\n')
        for line in lines:
            self.tail.append(line)
            self.on_line(line)
        return len(s)

    def flush(self) -> None:
        if self.forward is not None:
            self.forward.flush()


def _detach_console_handlers(capture: _ConsoleCapture) -> None:
    """Remove the basicsr logger's console handler that writes to ``capture`` (its file handler stays)."""
    log = logging.getLogger('basicsr')
    for handler in list(log.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler, 'stream', None) is capture:
            log.removeHandler(handler)


# ------------------------------------------------------------------------------------------ training
def _quick_option(opt: dict, total_iter: int, root: Path) -> Path:
    """The option file with fewer iterations (quick mode: tests), written under ``root/experiments``."""
    opt = copy.deepcopy(opt)
    opt['train']['total_iter'] = total_iter
    sched = opt['train']['scheduler']
    if 'periods' in sched:
        sched['periods'] = [total_iter]
    opt['logger']['save_checkpoint_freq'] = max(total_iter, 1)
    opt['logger']['print_freq'] = max(total_iter // 2, 1)
    path = root / 'experiments' / f'{opt["name"]}_quick.yml'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(opt)), sort_keys=False))
    return path


def _run_option(opt_path: Path, root: Path, total_iter: int | None, console: Console, prefix: str,
                verbose: bool = False) -> tuple[Path, bool]:
    """Train one option file (optionally with fewer iterations) with a progress line; returns the
    latest student checkpoint and whether it was trained now (False: reused)."""
    from krdistill.train import main as train_main
    opt = load_option(opt_path)
    exp = root / 'experiments' / opt['name']
    latest = exp / 'models' / 'net_g_latest.pth'
    if latest.is_file():
        console.line(f'{prefix}: trained before, reusing {latest.relative_to(root)}')
        return latest, False
    if total_iter is not None:  # quick mode (tests): same configs, fewer iterations
        opt_path = _quick_option(opt, total_iter, root)
        opt = load_option(opt_path)
    progress = _TrainingProgress(console, prefix, opt['train']['total_iter'])
    real_stderr = sys.stderr
    capture = _ConsoleCapture(progress.log_line, forward=real_stderr if verbose else None)
    cwd = os.getcwd()
    os.chdir(root)  # BasicSR resolves relative dataroots and model paths against the working folder
    try:
        with contextlib.redirect_stdout(capture), contextlib.redirect_stderr(capture):
            train_main(['-opt', str(opt_path)], root_path=str(root))
    except BaseException:
        if not verbose:  # show what BasicSR said before it failed (the full log is in the experiment folder)
            console.line(f'{prefix}: failed; the last lines of its log:')
            real_stderr.write('\n'.join(capture.tail) + '\n')
        raise
    finally:
        os.chdir(cwd)
        _detach_console_handlers(capture)
    if not latest.is_file():
        raise RuntimeError(f'training {opt_path} finished without writing {latest}')
    logs = sorted(exp.glob('train_*.log'))
    where = logs[-1].relative_to(root) if logs else exp.relative_to(root)
    console.line(f'{prefix}: {progress.total} iterations in {_seconds(time.time() - progress.t0)}, log {where}')
    return latest, True


def _load_network(opt_path: Path, ckpt: Path) -> torch.nn.Module:
    opt = load_option(opt_path)
    return load_network(build_network(copy.deepcopy(opt['network_g'])), ckpt, 'params')


# ------------------------------------------------------------------------------------------ crops
def crop_box(hr: np.ndarray, size: int = CROP_SIZE, margin: int = 4 * SCALE) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the most textured ``size`` x ``size`` window of ``hr`` (largest sum of
    gradient magnitude on the gray image, ``margin`` pixels away from the border; first maximum)."""
    gray = cv2.cvtColor(hr, cv2.COLOR_BGR2GRAY).astype(np.float64)
    mag = np.hypot(cv2.Sobel(gray, cv2.CV_64F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_64F, 0, 1, ksize=3))
    h, w = mag.shape
    if h < size + 2 * margin or w < size + 2 * margin:
        raise ValueError(f'image {h}x{w} is too small for a {size}px crop with a {margin}px margin')
    integral = cv2.integral(mag)  # (h+1) x (w+1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    sums = sums[margin:h - size - margin + 1, margin:w - size - margin + 1]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y) + margin, int(x) + margin


def _label(cell_w: int, lines: list[str]) -> np.ndarray:
    band = np.full((LABEL_HEIGHT, cell_w, 3), 32, np.uint8)
    for i, text in enumerate(lines[:2]):
        scale = 0.5
        while scale > 0.3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > cell_w - 8:
            scale -= 0.05
        cv2.putText(band, text, (4, 16 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return band


def crops_figure(rows: list[dict], size: int = CROP_SIZE, zoom: int = CROP_ZOOM) -> np.ndarray:
    """Compose the crops picture (uint8 BGR).

    ``rows``: one dict per image: ``name``, ``hr`` (the HR image) and ``columns``, a list of
    ``(label, image, psnr)`` with every image the size of ``hr`` (``psnr`` None: no PSNR shown).
    Every column's crop is cut at the same HR coordinates (:func:`crop_box` on ``hr``) and
    enlarged ``zoom`` times (nearest neighbour); each cell is a label band over the crop with a
    ``CROP_GAP`` border right and below, so the picture is ``len(columns) * (size * zoom + CROP_GAP)``
    pixels wide and ``len(rows) * (LABEL_HEIGHT + size * zoom + CROP_GAP)`` high.
    """
    cell = size * zoom
    out = []
    for row in rows:
        hr = row['hr']
        y, x = crop_box(hr, size)
        tiles = []
        for label, img, psnr in row['columns']:
            if img.shape != hr.shape:
                raise ValueError(f'{row["name"]}, {label}: image {img.shape} is not the HR size {hr.shape}')
            crop = cv2.resize(img[y:y + size, x:x + size], (cell, cell), interpolation=cv2.INTER_NEAREST)
            second = f'Y-PSNR {psnr:.2f} dB' if psnr is not None else f'{row["name"]} @ y{y} x{x}'
            tile = np.concatenate([_label(cell, [label, second]), crop], axis=0)
            tiles.append(np.pad(tile, ((0, CROP_GAP), (0, CROP_GAP), (0, 0))))
        out.append(np.concatenate(tiles, axis=1))
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------------ the demo
def run(root: Path, options_dir: Path, total_iter: int | None = None, log: Callable[[str], None] | None = None,
        verbose: bool = False, console: Console | None = None) -> dict:
    """Prepare data, train every demo run, evaluate and write the crops picture; returns the results dict.

    Output goes to ``console`` (default: a :class:`Console` on stdout), or line by line to ``log``.
    """
    if console is None:
        console = Console(write_line=log) if log is not None else Console()
    root, options_dir = Path(root).resolve(), Path(options_dir).resolve()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    runs = [(label, options_dir / f'{name}.yml') for label, name in RUNS if (options_dir / f'{name}.yml').is_file()]
    n_stages = len(runs) + 2
    t0 = time.time()
    prefix = f'[demo 1/{n_stages}] data'
    console.status(f'{prefix}: writing the demo data set')
    base = prepare_data(root, log=lambda _: None)
    n_sub = len(list((base / 'train' / 'HR_sub').glob('*.png')))
    console.line(f'{prefix}: {n_sub} training sub-images, {len(TEST_IMAGES)} held-out test images in '
                 f'{base.relative_to(root)} ({_seconds(time.time() - t0)})')

    ckpts = {}
    for i, (label, opt_path) in enumerate(runs, 2):
        ckpts[label], _ = _run_option(opt_path, root, total_iter, console, f'[demo {i}/{n_stages}] {label}',
                                      verbose)

    prefix = f'[demo {n_stages}/{n_stages}] evaluation'
    t_eval = time.time()
    console.status(f'{prefix}: {len(runs) + 1} methods on {len(TEST_IMAGES)} held-out images')
    pairs = load_pairs(base / 'test' / 'HR', SCALE, base / 'test' / f'LRbicx{SCALE}')
    results = {'bicubic': evaluate(None, pairs, SCALE)}
    results['bicubic']['params'] = 0
    nets = {}
    for label, opt_path in runs:
        net = nets[label] = _load_network(opt_path, ckpts[label])
        res = evaluate(net, pairs, SCALE)
        res['params'] = sum(p.numel() for p in net.parameters())
        results[label] = res
    out = root / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / 'demo_results.json').write_text(json.dumps(results, indent=2))

    by_name = {p['name']: p for p in pairs}
    rows = []
    for name in CROP_IMAGES:
        p = by_name[name]
        psnr = {label: next(r['psnr'] for r in res['images'] if r['name'] == name) for label, res in results.items()}
        images = {'HR': p['hr'], 'bicubic': bicubic_upscale(p['lr'], SCALE)}
        images.update({label: super_resolve(net, p['lr']) for label, net in nets.items()})
        rows.append(dict(name=name, hr=p['hr'], columns=[(c, images[c], psnr.get(c)) for c in CROP_COLUMNS
                                                        if c in images]))
    write_image(root / CROPS_PNG, crops_figure(rows))
    console.line(f'{prefix}: {len(runs) + 1} methods on {len(TEST_IMAGES)} held-out images, crops of '
                 f'{", ".join(CROP_IMAGES)} ({_seconds(time.time() - t_eval)})')
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
    parser.add_argument('--verbose', action='store_true', help="also print BasicSR's full training log")
    args = parser.parse_args(argv)
    options_dir = Path(args.options) if args.options else Path(__file__).resolve().parents[2] / 'options' / 'demo'
    if not options_dir.is_dir():
        raise SystemExit(f'--options: no such folder {options_dir}; run from a krdistill checkout or pass --options')
    t0 = time.time()
    root = Path(args.root)
    results = run(root, options_dir, args.total_iter, verbose=args.verbose)
    print(f'\nHeld-out images from skimage.data ({", ".join(TEST_IMAGES)}), x{SCALE}, Y channel, border {SCALE}:\n')
    print(table(results))
    print(f'\nCrops (HR, bicubic, each network; PSNR on that image): {root / CROPS_PNG}')
    print(f"BasicSR's full training logs: {root / 'experiments'}/<name>/train_<name>_<time>.log (--verbose prints them)")
    print(f'Total time {_seconds(time.time() - t0)}. JSON: {root / RESULTS_DIR / "demo_results.json"}')


if __name__ == '__main__':
    main()
