"""Distillation benchmark: MetaKD against hand-crafted KD, side by side, in a plain PyTorch loop.

One command (``tools/benchmark.py``) does everything, resumably (a finished run is never
retrained; the patch pool, the teacher's precomputed outputs/features and the time plan are
reused from the run folder):

1. build a fixed cache of random HR/LR patch pairs from a fixed seed (area-weighted image
   choice, random position, one of the 8 flips/transposes; LR by exact MATLAB bicubic of the
   whole image);
2. load (or train) the teacher and compute, ONCE for the whole pool, its outputs and the
   features the methods tap (fp16, on disk under the run folder, read row by row);
3. measure a few iterations of every method (two 1-thread jobs at once, as in the real run),
   fit the iterations to the time budget and print the plan with the predicted time;
4. run every (method, seed) job -- the same student, the same initialisation and the same
   per-seed batch order for every method -- in ``workers`` processes with ``threads`` threads
   each, then the ablations (1 seed, fewer iterations);
5. evaluate (Y-PSNR/SSIM, border = scale, reference LR) and write ``results.md``,
   ``results.json``, ``curves.png`` and ``visual.png``.

Every method is the shipped algorithm: a method block is written in the option files' vocabulary
(:mod:`krbench.methods`: ``output_kd_opt``, ``kd_opt``, ``network_kr``, ``meta``, ...), built by
:func:`krdistill.build.build_distiller` / :func:`~krdistill.build.build_metakd` (the builders
BasicSR's models use), and each iteration is their ``train_step`` with the
teacher's cached ``(out_t, feats_t)`` passed as ``teacher=``. So the meta batch is MetaKD's own
rule (the previous training batch whose step was taken) and a non-finite step is not taken (it
is counted in ``result.json``). Config schema: ``options/bench/cpu_x4.yml``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

import krdistill  # noqa: F401  (shims and registration before basicsr)
from krdistill import evaluation as ev
from krdistill.build import build_distiller, build_metakd, build_optimizer, probe_pairs
from krdistill.io import list_images, read_image
from krdistill.metakd import texture_stats
from krdistill.upcycle import Upcycled, zoom_out
from krdistill.kr_picture import texture_weights

from .memprobe import reset_peak_rss, status_kib
from .methods import (PIXEL_OPT, ablation_block, canonical, check_method, comparable_config, is_metakd, meta_every,
                      method_options)

__all__ = ['load_config', 'build_net', 'method_options', 'build_method', 'run_job', 'run', 'main', 'RowFile',
           'batch_order', 'to_float', 'make_plan', 'METHOD_LABELS', 'PIXEL_OPT', 'execute', 'mean_std', 'plus_minus',
           'job_spec', 'prepare', 'reference_scores', 'iteration_budget', 'reusable']

METHOD_LABELS = {
    'bicubic': 'bicubic', 'teacher': 'teacher', 'student_alone': 'student alone', 'output_kd': 'output KD',
    'fitnet': 'FitNet', 'at': 'AT', 'fakd': 'FAKD', 'metakd_exact': 'MetaKD (exact)',
    'metakd_fd': 'MetaKD (finite difference)', 'fitnet_out': 'FitNet + output KD',
    'metakd_frozen': 'MetaKD frozen at init',
    'fitnet_out_fastreg': 'FitNet + output KD, regressor at lr 1e-2',
    'metakd_onestep': 'MetaKD, one-step objective (v3)',
    'metakd_late': 'MetaKD (quiz split, late start, horizon)',
    'dukd': 'DUKD (output KD + data upcycling, 1 step)', 'dukd_2step': 'DUKD, 2 optimizer steps (reference)',
    'dukd_fitnet': 'DUKD + FitNet (regressor at lr 1e-2)', 'dukd_eqc': "DUKD at output KD's compute",
    'dukd_zoom2': 'DUKD, 2 zoom-in tiles per patch', 'dukd_zoom4': 'DUKD, 4 zoom-in tiles per patch',
}
HANDCRAFTED = ('output_kd', 'fitnet', 'at', 'fakd', 'fitnet_out', 'fitnet_out_fastreg', 'dukd', 'dukd_2step',
               'dukd_fitnet', 'dukd_zoom2', 'dukd_zoom4')


def log(*a):
    print(time.strftime('%H:%M:%S'), *a, flush=True)


# ============================================================================================ config
def load_config(path) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for key in ('scale', 'data', 'pool', 'student', 'train', 'methods'):
        if key not in cfg:
            raise KeyError(f'{path}: missing top-level key {key!r}')
    for name, mcfg in cfg['methods'].items():
        check_method(mcfg, f'{path}: methods.{name}')  # the schema, checked before any work
    for v, vc in ((cfg.get('ablations') or {}).get('variants') or {}).items():
        check_method(ablation_block(cfg['methods'], vc, f'{path}: ablations.variants.{v}'),
                     f'{path}: ablations.variants.{v}')
    return cfg


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_net(net_opt: dict) -> nn.Module:
    return ev.build_network(net_opt)


# ============================================================================================ patch pool
def _train_images(cfg: dict, data_root: Path, part: str = 'train') -> list[Path]:
    """The training images (``part='train'``) or the held-out quiz split (``'quiz'``).

    ``data.quiz: {fraction, seed}`` holds a seeded random fraction of the training images out of
    the patch pool of every row; only MetaKD's meta batches (``methods.<name>.meta_data: quiz``) see them.
    """
    exclude = {str(Path(e)) for e in cfg['data'].get('exclude', [])}
    paths = []
    for folder in cfg['data']['train_hr']:
        for p in list_images(data_root / folder):
            if str(p.relative_to(data_root)) not in exclude:
                paths.append(p)
    quiz = cfg['data'].get('quiz')
    if not quiz:
        if part == 'quiz':
            raise ValueError('data.quiz: not set (needed by meta_data: quiz): give {fraction, seed}')
        return paths
    frac = float(quiz['fraction'])
    if not 0 < frac < 1:
        raise ValueError(f'data.quiz.fraction: must be in (0, 1), got {frac!r}')
    k = max(1, int(round(len(paths) * frac)))
    held = set(np.random.default_rng(int(quiz.get('seed', 0))).choice(len(paths), k, replace=False).tolist())
    return [p for i, p in enumerate(paths) if (i in held) == (part == 'quiz')]


def _rows_write(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    arr.tofile(path)
    with open(str(path) + '.json', 'w') as f:
        json.dump(dict(shape=list(arr.shape), dtype=str(arr.dtype)), f)


class RowFile:
    """Read rows of a raw array file by index (no mmap: the process RSS stays the model's)."""

    def __init__(self, path):
        with open(str(path) + '.json') as f:
            meta = json.load(f)
        self.shape = tuple(meta['shape'])
        self.dtype = np.dtype(meta['dtype'])
        self.row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.f = open(path, 'rb', buffering=0)

    def __len__(self):
        return self.shape[0]

    def take(self, idx) -> np.ndarray:
        out = np.empty((len(idx), ) + self.shape[1:], self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        for k, i in enumerate(idx):
            self.f.seek(int(i) * self.row)
            self.f.readinto(buf[k * self.row:(k + 1) * self.row])
        return out

    def rows(self, idx, device) -> torch.Tensor:
        """Rows ``idx`` as a tensor on ``device`` (the stored dtype)."""
        return torch.from_numpy(self.take(idx)).to(device)


class DeviceRows:
    """A :class:`RowFile` read whole into ``device`` memory once (``train.preload``: a GPU run then
    takes its batches without disk reads or host-to-device copies); the same rows, value for value."""

    def __init__(self, path, device):
        rf = RowFile(path)
        self.data = torch.from_numpy(np.fromfile(path, rf.dtype).reshape(rf.shape)).to(device)

    def __len__(self):
        return self.data.shape[0]

    def rows(self, idx, device) -> torch.Tensor:
        return self.data[torch.as_tensor(np.asarray(idx), device=self.data.device)].to(device)


def build_pool(cfg: dict, data_root: Path, cache: Path, part: str = 'train') -> Path:
    """The fixed patch pool: ``pool_hr`` (N x 3 x g x g) and ``pool_lr`` uint8 RGB, from ``pool.seed``.

    ``part='quiz'``: ``pool.quiz_size`` patches of the held-out quiz images (``data.quiz``)."""
    scale, pc = cfg['scale'], dict(cfg['pool'])
    # only what the patches depend on (not the test/val sets: another evaluation reuses the pool)
    what = dict(pool=pc, train_hr=cfg['data']['train_hr'], exclude=cfg['data'].get('exclude', []), scale=scale)
    if cfg['data'].get('quiz'):  # (a config without a quiz split keeps its pool's old name)
        what.update(quiz=cfg['data']['quiz'], part=part)
    key = _hash(what)
    if part == 'quiz':
        pc.update(size=int(pc.get('quiz_size', 2000)), seed=int(pc['seed']) + 1)
    folder = cache / f'{"quiz" if part == "quiz" else "pool"}_{key}'
    if (folder / 'done').exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    paths = _train_images(cfg, data_root, part)
    log(f'{part} pool: {len(paths)} images, making LR (MATLAB bicubic x{scale}) ...')
    hrs, lrs = [], []
    for p in paths:
        hr = ev.mod_crop(read_image(p), scale)[:, :, ::-1]  # RGB
        hrs.append(np.ascontiguousarray(hr))
        lrs.append(ev.bicubic_downscale(np.ascontiguousarray(hr), scale))
    g = pc['gt_size']
    l = g // scale
    # images smaller than a patch (a few T91 images are 78 px) are not drawn
    areas = np.array([h.shape[0] * h.shape[1] * (min(h.shape[:2]) >= g) for h in hrs], np.float64)
    if not areas.any():
        raise ValueError(f'pool: no training image has both sides >= gt_size {g}')
    rng = np.random.default_rng(pc['seed'])
    n = pc['size']
    img_idx = rng.choice(len(hrs), size=n, p=areas / areas.sum())
    pool_hr = np.empty((n, 3, g, g), np.uint8)
    pool_lr = np.empty((n, 3, l, l), np.uint8)
    for k, i in enumerate(img_idx):
        lr = lrs[i]
        y = rng.integers(0, lr.shape[0] - l + 1)
        x = rng.integers(0, lr.shape[1] - l + 1)
        t = rng.integers(0, 8)
        ph = hrs[i][y * scale:(y + l) * scale, x * scale:(x + l) * scale]
        pl = lr[y:y + l, x:x + l]
        ph, pl = _dihedral(ph, t), _dihedral(pl, t)
        pool_hr[k] = ph.transpose(2, 0, 1)
        pool_lr[k] = pl.transpose(2, 0, 1)
    _rows_write(folder / 'pool_hr.bin', pool_hr)
    _rows_write(folder / 'pool_lr.bin', pool_lr)
    with open(folder / 'images.json', 'w') as f:
        json.dump([str(p.relative_to(data_root)) for p in paths], f)
    (folder / 'done').write_text('ok')
    log(f'pool: {n} patch pairs {g}/{l} written to {folder}')
    return folder


def _dihedral(img: np.ndarray, t: int) -> np.ndarray:
    if t & 1:
        img = img[:, ::-1]
    if t & 2:
        img = img[::-1]
    if t & 4:
        img = img.transpose(1, 0, 2)
    return np.ascontiguousarray(img)


def to_float(x: np.ndarray, device='cpu') -> torch.Tensor:
    """uint8 rows (N x 3 x H x W) as float in [0, 1] on ``device``."""
    return torch.from_numpy(x).to(device).float().div_(255.)


# ============================================================================================ teacher
def _lr_schedule(opt, iters, eta_min=0.0):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=eta_min)


def get_teacher(cfg: dict, pool: Path, out: Path, teacher_ckpt: str | None, threads: int, device='cpu') -> Path:
    """The teacher checkpoint: the given file, or one trained here on the pool (resumable)."""
    if teacher_ckpt:
        return Path(teacher_ckpt)
    tc = cfg['teacher']
    path = out / 'teacher' / 'teacher.pth'
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tr = tc['train']
    torch.set_num_threads(threads)
    torch.manual_seed(tr.get('seed', 0))
    net = build_net(tc['network']).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=float(tr['lr']), betas=tuple(cfg['train']['betas']))
    sched = _lr_schedule(opt, tr['iters'], float(tr.get('eta_min', 0)))
    hr_f, lr_f = RowFile(pool / 'pool_hr.bin'), RowFile(pool / 'pool_lr.bin')
    order = batch_order(len(hr_f), tr['iters'] + 1, cfg['train']['batch'], tr.get('seed', 0))
    t0 = time.time()
    for it in range(1, tr['iters'] + 1):
        idx = order[it - 1]
        lq, gt = to_float(lr_f.take(idx), device), to_float(hr_f.take(idx), device)
        loss = nn.functional.l1_loss(net(lq), gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 100 == 0:
            el = time.time() - t0
            log(f'teacher it {it}/{tr["iters"]} l1 {loss.item():.4f} ETA {el / it * (tr["iters"] - it) / 60:.1f} min')
    torch.save({'params': net.state_dict()}, path)
    return path


def precompute_teacher(cfg: dict, pool: Path, ckpt: Path, layers: list[str], cache: Path, threads: int,
                       device='cpu') -> Path:
    """Teacher outputs and the tapped features for every pool patch, fp16 row files (once)."""
    from krdistill.features import FeatureRecorder
    with open(ckpt, 'rb') as f:  # the weights, not the file's path or date: a moved cache stays valid
        digest = hashlib.sha256(f.read()).hexdigest()
    key = _hash(dict(pool=pool.name, ckpt=digest, layers=layers, net=cfg['teacher']['network']))
    folder = cache / f'teacher_{key}'
    if (folder / 'done').exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    net = ev.load_network(build_net(cfg['teacher']['network']), ckpt).eval().to(device)
    lr_f = RowFile(pool / 'pool_lr.bin')
    n = len(lr_f)
    rec = FeatureRecorder(net, layers, key='kd.teacher_layers', detach=True)
    files, bs = None, 32
    names = ['out_t.bin'] + [f'feat_{name}.bin' for name in layers]
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, n, bs):
            idx = np.arange(s, min(n, s + bs))
            with rec:
                out = net(to_float(lr_f.take(idx), device))
            feats = rec.features()
            if files is None:
                shapes = [(n, ) + tuple(out.shape[1:])] + [(n, ) + tuple(f.shape[1:]) for f in feats]
                files = []
                for nm, shp in zip(names, shapes):
                    files.append(np.memmap(folder / nm, np.float16, 'w+', shape=shp))
                    with open(str(folder / nm) + '.json', 'w') as f:
                        json.dump(dict(shape=list(shp), dtype='float16'), f)
            for mm, t in zip(files, [out] + feats):
                mm[s:s + len(idx)] = t.half().cpu().numpy()
            if (s // bs) % 50 == 0:
                el = time.time() - t0
                done = s + len(idx)
                log(f'teacher precompute {done}/{n} ETA {el / done * (n - done) / 60:.1f} min')
    rec.remove()
    for mm in files:
        mm.flush()
    del files
    (folder / 'done').write_text('ok')
    log(f'teacher precompute done in {time.time() - t0:.0f} s -> {folder}')
    return folder


def precompute_upcycle(cfg: dict, pool: Path, ckpt: Path, cache: Path, threads: int, device='cpu',
                       zoom_in: int = 1) -> Path:
    """DUKD's upcycled data for every pool patch (once per ``zoom_in``): ``zoom_in`` distinct zoom-in
    tiles per patch (``zin_tile``, ``n x zoom_in``, drawn from ``pool.seed``) with the teacher's output
    of each (``zin_t``, patch-major rows), and the teacher's output of the zoomed-out LR patch
    (``zout_t``), fp16 row files. The rows train exactly as the teacher run online would, except that
    a patch always brings the same tiles (the pool is fixed already)."""
    from krdistill.upcycle import zoom_out
    with open(ckpt, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    k = max(1, int(zoom_in))
    what = dict(pool=pool.name, ckpt=digest, net=cfg['teacher']['network'], what='upcycle-v1')
    key = _hash(what if k == 1 else dict(what, zoom_in=k))  # one tile: the cache of the runs already made
    folder = cache / f'upcycle_{key}'
    if (folder / 'done').exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    scale = cfg['scale']
    net = ev.load_network(build_net(cfg['teacher']['network']), ckpt).eval().to(device)
    hr_f, lr_f = RowFile(pool / 'pool_hr.bin'), RowFile(pool / 'pool_lr.bin')
    n = len(lr_f)
    rng = np.random.default_rng(int(cfg['pool']['seed']) + 3)
    tiles = rng.integers(0, scale * scale, n)[:, None] if k == 1 else \
        np.argsort(rng.random((n, scale * scale)), axis=1)[:, :k]  # distinct tiles of each patch
    _rows_write(folder / 'zin_tile.bin', tiles.astype(np.int64).reshape(-1))
    g, l = hr_f.shape[-1], lr_f.shape[-1]
    zin_mm = np.memmap(folder / 'zin_t.bin', np.float16, 'w+', shape=(n * k, 3, g, g))
    lo = -(-l // scale) * scale  # the teacher's output of the zoomed-out LR patch
    zout_mm = np.memmap(folder / 'zout_t.bin', np.float16, 'w+', shape=(n, 3, lo, lo))
    for name, shp in (('zin_t.bin', (n * k, 3, g, g)), ('zout_t.bin', (n, 3, lo, lo))):
        with open(str(folder / name) + '.json', 'w') as f:
            json.dump(dict(shape=list(shp), dtype='float16'), f)
    t0, bs = time.time(), 32
    with torch.no_grad():
        for s0 in range(0, n, bs):
            idx = np.arange(s0, min(n, s0 + bs))
            gt, lq = to_float(hr_f.take(idx), device), to_float(lr_f.take(idx), device)
            zin_mm[s0 * k:(s0 + len(idx)) * k] = net(upcycle_tiles(gt, tiles[idx], scale)).half().cpu().numpy()
            zout_mm[s0:s0 + len(idx)] = net(zoom_out(lq, scale)).half().cpu().numpy()
            if (s0 // bs) % 50 == 0:
                done = s0 + len(idx)
                log(f'upcycle precompute {done}/{n} ETA {(time.time() - t0) / done * (n - done) / 60:.1f} min')
    zin_mm.flush()
    zout_mm.flush()
    del zin_mm, zout_mm
    (folder / 'done').write_text('ok')
    log(f'upcycle precompute done in {time.time() - t0:.0f} s -> {folder}')
    return folder


def upcycle_tiles(gt: torch.Tensor, tile: np.ndarray, scale: int) -> torch.Tensor:
    """Tiles ``tile[i]`` (``B`` or ``B x k`` indices, row-major in the ``scale x scale`` grid) of each
    GT patch: the cached zoom-in inputs, ``B*k x C x H/scale x W/scale``, sample-major like
    :func:`krdistill.upcycle.zoom_in_tiles`."""
    b, c, hh, ww = gt.shape
    h, w = hh // scale, ww // scale
    tiles = gt.reshape(b, c, scale, h, scale, w).permute(0, 2, 4, 1, 3, 5).reshape(b, scale * scale, c, h, w)
    pick = torch.as_tensor(np.asarray(tile), device=gt.device).reshape(b, -1)
    return tiles[torch.arange(b, device=gt.device)[:, None], pick].reshape(-1, c, h, w)


def step_flops(cfg: dict, method: str, mcfg: dict, batch: int = 2) -> float:
    """Floating-point operations of one training iteration of ``method`` as a user runs it (the
    teacher online, no cache): teacher forwards plus the student's forward and backward, counted by
    ``torch.utils.flop_counter`` on a ``batch`` of pool-sized patches. What ``equal_compute`` compares."""
    from torch.utils.flop_counter import FlopCounterMode
    if is_metakd(mcfg):
        raise ValueError(f'methods.{method}.equal_compute: only for the hand-crafted rows (not MetaKD)')
    torch.manual_seed(0)
    teacher, student = build_net(cfg['teacher']['network']), build_net(cfg['student']['network'])
    spec = dict(method=method, method_cfg={k: v for k, v in (mcfg or {}).items() if k != 'equal_compute'},
                teacher_layers=list(cfg['kd']['teacher_layers']), student_layers=list(cfg['kd']['student_layers']),
                shapes=_shapes(cfg), iters=1)
    algo, _ = build_method(spec, teacher, student)
    g = cfg['pool']['gt_size']
    gt = torch.rand(batch, 3, g, g)
    lq = torch.nn.functional.avg_pool2d(gt, cfg['scale'])
    opt = torch.optim.Adam(list(student.parameters()) + algo.kd_parameters(), 1e-4)
    with FlopCounterMode(display=False) as fc:
        algo.train_step(lq, gt, opt)
    return float(fc.get_total_flops())


def iteration_budget(cfg: dict, method: str, mcfg: dict, iters: int) -> int:
    """The run length of ``method`` at ``iters`` nominal iterations: ``iters``, or with
    ``equal_compute: <row>`` the iterations whose teacher + student FLOPs equal ``<row>``'s at ``iters``."""
    ref = (mcfg or {}).get('equal_compute')
    if not ref:
        return iters
    if ref not in cfg['methods']:
        raise KeyError(f'methods.{method}.equal_compute: {ref!r} is not a method of this config')
    ratio = step_flops(cfg, ref, cfg['methods'][ref]) / step_flops(cfg, method, mcfg)
    return max(1, int(round(iters * ratio)))


# ============================================================================================ one job
def batch_order(n: int, batches: int, batch: int, seed: int) -> np.ndarray:
    """The per-seed batch order (the same for every method): concatenated permutations."""
    rng = np.random.default_rng(10_000 + seed)
    need = batches * batch
    idx = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])[:need]
    return idx.reshape(batches, batch)


def _psnr_y_only(net, pairs, scale, device='cpu') -> float:
    from basicsr.metrics import calculate_psnr
    vals = [calculate_psnr(ev.super_resolve(net, p['lr'], device), p['hr'], crop_border=scale, input_order='HWC',
                           test_y_channel=True) for p in pairs]
    return float(np.mean(vals))


def build_method(spec: dict, teacher: nn.Module, student: nn.Module):
    """The method of ``spec`` built by the shipped builders: ``(algorithm, optimizer_kr)``.

    ``algorithm`` is a :class:`~krdistill.distiller.Distiller` (the student alone: no teacher, the
    pixel loss only; the hand-crafted methods) or a :class:`~krdistill.metakd.MetaKD`;
    ``optimizer_kr`` is the KRNets' optimizer (None for the other methods).
    """
    mcfg = spec['method_cfg'] or {}
    opts = method_options(mcfg, f'methods.{spec["method"]}')
    tl, sl = spec['teacher_layers'], spec['student_layers']
    shapes = spec.get('shapes')
    if 'network_kr' in opts:
        optim_kr = opts.pop('optim_kr')
        if mcfg.get('start_fraction'):
            opts.setdefault('meta', {})['start'] = int(round(spec['iters'] * float(mcfg['start_fraction'])))
        mkd = build_metakd(teacher, student, tl, sl, shapes=shapes, keys=_keys(spec['method']), **opts)
        if mcfg.get('meta_data') == 'quiz':
            if not spec.get('quiz_pool'):
                raise ValueError(f'methods.{spec["method"]}.meta_data: quiz needs data.quiz in the config')
            mkd.set_meta_data(QuizBatches(spec['quiz_pool'], spec['batch'], spec['seed'], spec.get('device') or 'cpu'))
        return mkd, optim_kr
    needs_teacher = 'kd_opt' in opts or 'output_kd_opt' in opts or 'upcycle_opt' in opts
    return build_distiller(teacher if needs_teacher else None, student, tl, sl, shapes=shapes,
                           keys=_keys(spec['method']), **opts), None


class QuizBatches:
    """MetaKD's meta batches from the held-out quiz pool: ``(lq, gt)`` batches, each pass a new
    seeded permutation (``MetaKD.set_meta_data`` cycles over passes)."""

    def __init__(self, pool, batch: int, seed: int, device='cpu'):
        self.hr, self.lr = RowFile(Path(pool) / 'pool_hr.bin'), RowFile(Path(pool) / 'pool_lr.bin')
        self.batch, self.device = batch, device
        self.rng = np.random.default_rng(20_000 + seed)

    def __iter__(self):
        perm = self.rng.permutation(len(self.hr))
        for s in range(0, len(perm) - self.batch + 1, self.batch):
            idx = np.sort(perm[s:s + self.batch])
            yield to_float(self.lr.take(idx), self.device), to_float(self.hr.take(idx), self.device)


def _keys(method: str) -> dict:
    """Option names in the builders' error messages: the protocol file's keys."""
    m = f'methods.{method}'
    return dict(teacher_layers='kd.teacher_layers', student_layers='kd.student_layers', pixel_opt='pixel_opt',
                **{k: f'{m}.{k}' for k in ('kd_opt', 'output_kd_opt', 'network_kr', 'texture_opt', 'meta',
                                           'upcycle_opt')})


def _meta_step_timer(sync, acc: list):
    """A phase hook (``Distiller.set_phase_hook``) appending each meta step's (device-synchronised)
    seconds to ``acc``."""
    @contextmanager
    def phase(name):
        if name != 'meta_step':
            yield
            return
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            acc.append(time.perf_counter() - t0)
    return phase


def _measure_it(i: int, total: int, n_meta: int, every: int) -> int:
    """The iteration number passed to ``train_step`` while measuring: the meta schedule reads only
    it, so the last ``n_meta`` of ``total`` iterations are meta iterations (multiples of
    ``every``) and the others not (with ``every == 1`` every iteration is one)."""
    return every * i if i > total - n_meta or every == 1 else every * i + 1


@torch.no_grad()
def _kr_stats(mkd, lq, feats_t) -> dict:
    """KRNet statistics on one batch: texture-weight entropy (nats; log N = uniform) and total
    texture weight (the learned gain; 1 without ``gain``), as MetaKD logs them
    (:func:`krdistill.metakd.texture_stats`), and the mean |cosine| between the N kernels of a
    sample (0 = diverse, 1 = all the same)."""
    _, feats_s = mkd.student_forward(lq)
    ent, cos, gain = [], [], []
    for kr, fs, ft in zip(mkd.krnets, feats_s, feats_t):
        o = kr(fs.detach(), ft)
        st = texture_stats(o)
        gain.append(float(st['texture_gain']))
        ent.append(float(st['texture_entropy']))
        k = o['kernels']
        k = k.reshape(k.shape[0], k.shape[1], -1)
        k = k / (k.norm(dim=-1, keepdim=True) + 1e-12)
        c = (k @ k.transpose(1, 2)).abs()
        nk = k.shape[1]
        cos.append(float((c.sum((1, 2)) - c.diagonal(dim1=1, dim2=2).sum(1)).mean() / max(1, nk * (nk - 1))))
    return dict(weight_entropy=ent, kernel_abs_cos=cos, texture_gain=gain)


def _kr_picture_input(spec: dict, algo, val_pairs: list, device) -> dict | None:
    """The first validation image (LR, at most 96 x 96 from its top-left) and the real teacher's
    features on it, for the per-texture weights over training and the final KRNet picture."""
    if not val_pairs or not spec.get('teacher_ckpt'):
        return None
    lr = val_pairs[0]['lr'][:96, :96]
    teacher = ev.load_network(build_net(spec['teacher_network']), spec['teacher_ckpt']).to(device)
    lq = to_float(lr[None, ..., ::-1].transpose(0, 3, 1, 2).copy(), device)
    from krdistill.features import FeatureRecorder
    with torch.no_grad(), FeatureRecorder(teacher, spec['teacher_layers']) as rec:
        teacher(lq)
        feats_t = [f.detach() for f in rec.features()]
    return dict(lq=lq, feats_t=feats_t, history={name: [] for name in algo.student_layers})


def run_job(spec: dict) -> dict:
    """Train one student for one (method, seed) and evaluate it; writes ``result.json``.

    Runs in a worker process (or in-process when ``workers == 0``). The method is built by
    :func:`build_method` and every iteration is its ``train_step`` on the cached teacher outputs.
    ``spec['measure']``: only time a few iterations (the student step and the meta step apart)
    and return the timings. Steps: :func:`reusable` (a finished run), :class:`CachedBatches` (the
    cached rows), :func:`build_job` (networks, method, optimizers), :func:`train_loop`, then
    :func:`measured` or :func:`finish_job` (evaluation, ``result.json``).
    """
    torch.set_num_threads(spec['threads'])
    measure = spec.get('measure')
    if not measure and reusable(spec):
        with open(Path(spec['run_dir']) / 'result.json') as f:
            return json.load(f)
    Path(spec['run_dir']).mkdir(parents=True, exist_ok=True)
    device = torch.device(spec.get('device') or 'cpu')
    batches = CachedBatches(spec, device)
    job = build_job(spec, device)
    val_pairs = [] if measure else ev.load_pairs(spec['val']['hr'], spec['scale'], spec['val'].get('lr'))
    kr_pic = _kr_picture_input(spec, job.algo, val_pairs, device) if job.is_meta and not measure else None
    rec = train_loop(spec, job, batches, val_pairs, kr_pic)
    if measure:
        return measured(spec, rec, job)
    return finish_job(spec, job, rec, kr_pic)


class CachedBatches:
    """The batches of one job, read from the cached rows: ``(lq, gt)`` of the patch pool, the
    teacher's cached ``(out_t, feats_t)`` (only what the method uses) and DUKD's upcycled data
    (:func:`precompute_upcycle`), in the per-seed :func:`batch_order`; ``train.preload`` reads
    every file into device memory once."""

    def __init__(self, spec: dict, device):
        pool, tcache = Path(spec['pool']), Path(spec['teacher_cache'])
        rows = (lambda p: DeviceRows(p, device)) if spec.get('preload') else RowFile
        self.hr, self.lr = rows(pool / 'pool_hr.bin'), rows(pool / 'pool_lr.bin')
        opts = method_options(spec['method_cfg'], f'methods.{spec["method"]}')
        uses_feats = 'kd_opt' in opts or 'network_kr' in opts
        self.out_t = rows(tcache / 'out_t.bin') if 'output_kd_opt' in opts else None
        self.feats = [rows(tcache / f'feat_{n}.bin') for n in spec['teacher_layers']] if uses_feats else []
        if 'upcycle_opt' in opts:
            ucache = Path(spec['upcycle_cache'])
            self.zin_tile = np.fromfile(ucache / 'zin_tile.bin', np.int64).reshape(len(self.hr), -1)
            self.zin_t, self.zout_t = rows(ucache / 'zin_t.bin'), rows(ucache / 'zout_t.bin')
        self.order = batch_order(len(self.hr), spec['iters'], spec['batch'], spec['seed'])
        self.scale, self.device = spec['scale'], device

    def get(self, it: int, upcycle=None):
        """Iteration ``it``'s ``(lq, gt, (out_t, feats_t), upcycled)`` (``upcycle``: the method's
        :class:`~krdistill.upcycle.Upcycle`, or None)."""
        idx, dev = self.order[it - 1], self.device
        lq, gt = self.lr.rows(idx, dev).float().div_(255.), self.hr.rows(idx, dev).float().div_(255.)
        out_t = self.out_t.rows(idx, dev).float() if self.out_t is not None else None
        feats_t = [f.rows(idx, dev).float() for f in self.feats]
        return lq, gt, (out_t, feats_t), (self.upcycled(upcycle, lq, gt, idx) if upcycle is not None else None)

    def upcycled(self, up, lq, gt, idx) -> Upcycled:
        o, dev = up.options, self.device
        k = self.zin_tile.shape[1]
        zin = upcycle_tiles(gt, self.zin_tile[idx], self.scale) if o.zoom_in else None
        zin_rows = (np.asarray(idx)[:, None] * k + np.arange(k)).reshape(-1)  # patch-major, like the tiles
        zout = zoom_out(lq, self.scale) if o.zoom_out else None
        return Upcycled(zin=zin, zin_t=self.zin_t.rows(zin_rows, dev).float() if o.zoom_in else None,
                        zout=zout, zout_t=self.zout_t.rows(idx, dev).float() if o.zoom_out else None, lq=lq,
                        zin_ops=up.augmentations(len(idx) * k) if o.zoom_in else None,
                        zout_ops=up.augmentations(len(idx)) if o.zoom_out else None)


def build_job(spec: dict, device) -> SimpleNamespace:
    """The student (``seed``'s init, the same for every method), the hook-only teacher, the method
    (:func:`build_method`; its KRNets / regressors from ``seed + 7919``), the optimizers and their
    cosine schedules, and MetaKD's meta-step timer."""
    iters, seed = spec['iters'], spec['seed']
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    torch.manual_seed(seed)
    student = build_net(spec['student_network'])  # same init for every method of a seed (made on the CPU)
    teacher = build_net(spec['teacher_network'])   # hooks only: outputs/features come from the cache
    torch.manual_seed(seed + 7919)                 # KRNets / regressors: the same init for every seed's method
    algo, optim_kr = build_method(spec, teacher, student)
    student.to(device)
    algo.to(device)
    is_meta = optim_kr is not None
    kd_params = algo.kd_parameters()  # FitNet regressors: stepped with the student (MetaKD: none)
    # optim_kd: the regressors in their own group (lr, betas), e.g. as fast as MetaKD's optim_kr
    reg_group = {k: (float(v) if k == 'lr' else tuple(v))
                 for k, v in ((spec['method_cfg'] or {}).get('optim_kd') or {}).items()}
    opt = build_optimizer({'type': 'Adam', 'lr': float(spec['lr']), 'betas': list(spec['betas'])},
                          [dict(params=list(student.parameters()))] +
                          ([dict(params=kd_params, **reg_group)] if kd_params else []), key='train')
    opt_kr = build_optimizer(optim_kr, algo.kr_parameters(), key=f'methods.{spec["method"]}.optim_kr') \
        if is_meta else None
    meta_times: list[float] = []
    if is_meta:  # the meta step's time, synchronised (the algorithm's phase hook)
        algo.set_phase_hook(_meta_step_timer(sync, meta_times))
    return SimpleNamespace(student=student, teacher=teacher, algo=algo, is_meta=is_meta, opt=opt,
                           sched=_lr_schedule(opt, iters), opt_kr=opt_kr,
                           sched_kr=_lr_schedule(opt_kr, iters) if opt_kr is not None else None,
                           every=algo.meta.every if is_meta else 1, meta_times=meta_times, sync=sync, device=device)


class JobRecord:
    """What a job's training loop records: times, skipped steps, the logged rows and curves."""

    def __init__(self):
        self.curve, self.stats, self.meta_log, self.skipped, self.step_times = [], [], [], [], []
        self.credit_acc: dict[str, list[float]] = {}
        self.t_train, self.n_meta, self.meta_iters, self.total = 0.0, 0, 0, 0
        self.peak_kib = self.rss0_kib = 0

    def meta_logs(self, it: int, logs: dict, algo) -> None:
        """Horizon credits every meta step, averaged over the logged window; every 10th meta step logged."""
        credits = {k: float(v) for k, v in logs.items() if k.endswith('_credit')}
        for k, v in credits.items():
            self.credit_acc.setdefault(k, []).append(v)
        if 'l_meta' not in logs and not credits:
            return
        self.n_meta += 1
        if self.n_meta % 10 != 1:
            return
        row = dict(it=it, l_meta=float(logs['l_meta']) if 'l_meta' in logs else None,
                   grad_norm=float(logs['meta_grad_norm']) if 'meta_grad_norm' in logs else None)
        row.update({k: float(np.mean(v)) for k, v in self.credit_acc.items()})
        row.update({f'{k}_n': len(v) for k, v in self.credit_acc.items()})
        row.update({name: float(p.detach()) for name, p in algo.branch_weights()} if hasattr(algo, 'branch_weights')
                   else {})
        self.meta_log.append(row)
        self.credit_acc.clear()


def train_loop(spec: dict, job: SimpleNamespace, batches: CachedBatches, val_pairs: list, kr_pic: dict | None
               ) -> JobRecord:
    """Every iteration: the method's ``train_step`` on the cached batch, the schedulers, the timings
    (the meta step apart), the logs, the validation curve."""
    measure, iters, algo = spec.get('measure'), spec['iters'], job.algo
    rec = JobRecord()
    reset_peak_rss()
    rec.rss0_kib = (status_kib('VmRSS') or 0)
    rec.total = total = measure['iters'] if measure else iters
    t_start = time.time()
    for it in range(1, total + 1):
        t0 = time.perf_counter()
        lq, gt, teacher_out, upcycled = batches.get(it, algo.upcycle)
        n_timed = len(job.meta_times)
        ts = time.perf_counter()
        if job.is_meta:
            sched_it = _measure_it(it, total, measure['meta'], job.every) if measure else it
            step = algo.train_step(lq, gt, job.opt, job.opt_kr, teacher=teacher_out, it=sched_it, upcycled=upcycled)
        else:
            step = algo.train_step(lq, gt, job.opt, teacher=teacher_out, it=it, upcycled=upcycled)
        with warnings.catch_warnings():  # no step taken (non-meta iteration, skipped step): the schedules advance
            warnings.simplefilter('ignore', UserWarning)
            job.sched.step()
            if job.sched_kr is not None:
                job.sched_kr.step()
        job.sync()
        t_end = time.perf_counter()
        rec.step_times.append(t_end - ts - sum(job.meta_times[n_timed:]))  # the student step and the schedulers
        rec.t_train += t_end - t0
        logs = step.logs
        if len(job.meta_times) > n_timed:
            rec.meta_iters += 1
        rec.meta_logs(it, logs, algo)
        if step.skipped is not None:
            rec.skipped.append(dict(it=it, why=step.skipped))
            if len(rec.skipped) <= 5:
                log(f'  [{spec["name"]}] it {it}: step not taken: {step.skipped}')
        if measure:
            continue
        if it % spec['log_every'] == 0 or it == iters:
            row = dict(it=it, **{k: float(v) for k, v in logs.items() if k != 't_meta'})
            if job.is_meta:
                row.update(_kr_stats(algo, lq, teacher_out[1]))
                if kr_pic is not None:
                    for name, w in texture_weights(algo, kr_pic['lq'], kr_pic['feats_t']).items():
                        kr_pic['history'][name].append(w)
            rec.stats.append(row)
        if it % spec['val_every'] == 0 or it == iters:
            rec.curve.append(dict(it=it, psnr=_psnr_y_only(job.student, val_pairs, spec['scale'], job.device)))
            el = time.time() - t_start
            log(f'  [{spec["name"]}] it {it}/{iters} loss {float(logs["l_total"]):.4f} val {rec.curve[-1]["psnr"]:.3f} '
                f'dB {rec.t_train / it:.3f} s/it, job ETA {el / it * (iters - it) / 60:.1f} min')
    rec.peak_kib = (status_kib('VmHWM') or 0)
    return rec


def measured(spec: dict, rec: JobRecord, job: SimpleNamespace) -> dict:
    """A measuring job's timings: the median student step (after ``warmup``) plus the per-iteration
    rest, and the mean meta step."""
    w = spec['measure'].get('warmup', 1)
    t_meta = sum(job.meta_times)
    plain = float(np.median(rec.step_times[w:])) if len(rec.step_times) > w else float(np.mean(rec.step_times))
    return dict(name=spec['name'], t_step=plain + (rec.t_train - sum(rec.step_times) - t_meta) / rec.total,
                t_meta=(t_meta / rec.meta_iters) if job.meta_times else 0.0, peak_mib=rec.peak_kib / 1024,
                skipped_steps=len(rec.skipped))


def finish_job(spec: dict, job: SimpleNamespace, rec: JobRecord, kr_pic: dict | None) -> dict:
    """Save the student (and KRNets, and their picture), evaluate it on the test sets and write
    ``result.json`` (atomically: a run is finished once that file is there)."""
    run_dir, iters, student, device = Path(spec['run_dir']), spec['iters'], job.student, job.device
    torch.save({'params': {k: v.cpu() for k, v in student.state_dict().items()}}, run_dir / 'student.pth')
    if job.is_meta:
        torch.save({'params': {k: v.cpu() for k, v in job.algo.krnets.state_dict().items()}}, run_dir / 'krnets.pth')
    if kr_pic is not None:  # what the KRNets transfer, on the first validation image (tools/kr_picture.py's picture)
        from krdistill.io import write_image
        from krdistill.kr_picture import draw_points
        ev.load_network(job.teacher, spec['teacher_ckpt'])  # the real teacher (training used its cached outputs)
        write_image(run_dir / 'kr.png', draw_points(job.algo, kr_pic['lq'], kr_pic['history']))
    t_meta = sum(job.meta_times)
    res = dict(name=spec['name'], method=spec['method'], seed=spec['seed'], iters=iters,
               nominal_iters=spec.get('nominal_iters') or iters, network=spec['student_network'],
               params=sum(p.numel() for p in student.parameters()), s_per_iter=rec.t_train / iters,
               meta_steps=rec.n_meta, meta_iters=rec.meta_iters,
               s_per_meta_step=(t_meta / rec.meta_iters) if job.meta_times else None,
               skipped_steps=len(rec.skipped), skipped=rec.skipped[:20],
               peak_rss_mib=rec.peak_kib / 1024, rss_start_mib=rec.rss0_kib / 1024, curve=rec.curve, stats=rec.stats,
               meta_log=rec.meta_log, device=str(device), tests={}, method_cfg=_as_json(spec['method_cfg']))
    if device.type == 'cuda':
        res['peak_cuda_mib'] = torch.cuda.max_memory_allocated(device) / 2**20
    for name, ts_ in spec['tests'].items():
        res['tests'][name] = ev.evaluate(student, ev.load_pairs(ts_['hr'], spec['scale'], ts_.get('lr')),
                                         spec['scale'], device)
    tmp = run_dir / 'result.json.tmp'
    with open(tmp, 'w') as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, run_dir / 'result.json')
    log(f'  [{spec["name"]}] done: ' + ', '.join(f'{k} {v["psnr"]:.3f} dB' for k, v in res['tests'].items()))
    return res


def _as_json(obj):
    return json.loads(json.dumps(obj))


def _same_block(old: dict, new: dict) -> bool:
    try:
        old = canonical(old)
    except (KeyError, TypeError, ValueError):  # a recorded block that no config may hold now: not this one
        return False
    return _as_json(old) == _as_json(canonical(new))


def reusable(spec: dict, log_fn=None) -> bool:
    """A finished run of this name whose recorded method block trains what this one does (runs
    written before the block was recorded are reused as they are; a block recorded in the first
    vocabulary is compared through :func:`~krbench.methods.from_legacy`). A run of a changed
    block is retrained."""
    path = Path(spec['run_dir']) / 'result.json'
    if not path.exists():
        return False
    with open(path) as f:
        old = json.load(f).get('method_cfg')
    if old is None or _same_block(old, spec['method_cfg']):
        return True
    if log_fn is not None:
        log_fn(f'{spec["name"]}: the method block changed since this run was trained: retraining it')
    return False

# ============================================================================================ plan
def _cost(meas: dict, iters: int, every: int | None) -> float:
    c = iters * meas['t_step']
    if every:
        c += iters / every * meas['t_meta']
    return c


def _lpt(costs: list[float], workers: int) -> float:
    """Makespan of longest-first scheduling on ``workers`` machines."""
    loads = [0.0] * max(1, workers)
    for c in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)


def make_plan(cfg: dict, meas: dict, overhead_s: float) -> dict:
    """Choose the iterations so the whole run fits ``budget.minutes``; returns the plan."""
    tr, bud = cfg['train'], cfg.get('budget', {})
    workers = max(1, bud.get('workers', 2))
    methods, seeds = cfg['methods'], tr['seeds']
    abl = cfg.get('ablations') or {}
    budget_s = bud.get('minutes', 1e9) * 60 - overhead_s
    val_s = bud.get('val_seconds', 0.0)
    job_s = bud.get('job_overhead_seconds', 0.0)  # process start, loading, final evaluation
    abl_frac = abl.get('iters_fraction', 0.3)

    def jobs_for(iters):
        jobs = []
        for m, mc in methods.items():
            for s in seeds:
                n_val = iters // tr['val_every'] + 1
                jobs.append((m, s, iters, _cost(meas[m], iters, meta_every(mc)) + n_val * val_s + job_s))
        ai = max(tr['val_every'], int(round(iters * abl_frac / 100)) * 100) if abl else 0
        for v, vc in (abl.get('variants') or {}).items():
            mc = _ablation_cfg(cfg, vc)
            jobs.append((f'abl_{v}', abl.get('seed', 0), ai,
                         _cost(meas[f'abl_{v}'], ai, meta_every(mc)) + (ai // tr['val_every'] + 1) * val_s + job_s))
        return jobs, ai

    iters = tr['iters']
    step = tr.get('iters_step', 100)
    while True:
        jobs, ai = jobs_for(iters)
        main_t = _lpt([j[3] for j in jobs if not j[0].startswith('abl_')], workers)
        t = _lpt([j[3] for j in jobs], workers)
        if t <= budget_s or iters - step < tr.get('min_iters', step):
            break
        iters -= step
    return dict(iters=iters, ablation_iters=ai, predicted_train_s=t, predicted_main_s=main_t, overhead_s=overhead_s,
                predicted_total_min=(t + overhead_s) / 60, workers=workers,
                jobs=[dict(name=j[0], seed=j[1], iters=j[2], predicted_s=j[3]) for j in jobs])


def _ablation_cfg(cfg: dict, vc: dict, name: str = '<name>') -> dict:
    return ablation_block(cfg['methods'], vc, f'ablations.variants.{name}')


# ============================================================================================ driver
def prepare(cfg: dict, data_root: Path, out: Path, teacher_ckpt: str | None, threads: int, device='cpu') -> dict:
    """Everything the jobs share (made once, reused from ``out/cache``): the patch pool, the quiz
    pool (``data.quiz``), the teacher, its cached outputs and features, the point shapes and the
    evaluation sets."""
    cache = out / 'cache'
    tests = {k: dict(hr=str(data_root / v['hr']), lr=str(data_root / v['lr']) if v.get('lr') else None)
             for k, v in cfg['data']['test'].items()}
    val = tests[cfg['data']['val']] if isinstance(cfg['data']['val'], str) else \
        dict(hr=str(data_root / cfg['data']['val']['hr']), lr=str(data_root / cfg['data']['val']['lr']))
    pool = build_pool(cfg, data_root, cache)
    quiz = build_pool(cfg, data_root, cache, 'quiz') if cfg['data'].get('quiz') else None
    if teacher_ckpt is None and cfg['teacher'].get('checkpoint'):
        teacher_ckpt = cfg['teacher']['checkpoint']
    tpath = get_teacher(cfg, pool, out, teacher_ckpt, threads, device)
    tcache = precompute_teacher(cfg, pool, tpath, list(cfg['kd']['teacher_layers']), cache, threads, device)
    ucaches = {k: str(precompute_upcycle(cfg, pool, tpath, cache, threads, device, k))
               for k in sorted({zoom_in_tiles_of(m) for m in cfg['methods'].values() if 'upcycle_opt' in (m or {})})}
    return dict(out=str(out), tests=tests, val=val, pool=str(pool), quiz_pool=str(quiz) if quiz else None,
                teacher_ckpt=str(tpath), teacher_cache=str(tcache), shapes=_shapes(cfg), device=device,
                upcycle_caches=ucaches)


def zoom_in_tiles_of(mcfg: dict | None) -> int:
    """The zoom-in tiles per patch a row's ``upcycle_opt`` asks for (its cache; at least 1)."""
    return max(1, int(((mcfg or {}).get('upcycle_opt') or {}).get('zoom_in', 1)))


def reference_scores(cfg: dict, ctx: dict, out: Path, threads: int, device='cpu') -> dict:
    """Bicubic and teacher scores on the test sets (once; ``out/reference.json``)."""
    path = out / 'reference.json'
    if path.exists():
        with open(path) as f:
            return json.load(f)
    torch.set_num_threads(threads)
    teacher = ev.load_network(build_net(cfg['teacher']['network']), ctx['teacher_ckpt']).to(device)
    ref = dict(bicubic={}, teacher={}, teacher_params=sum(p.numel() for p in teacher.parameters()))
    for k, t in ctx['tests'].items():
        pairs = ev.load_pairs(t['hr'], cfg['scale'], t['lr'])
        ref['bicubic'][k] = ev.evaluate(None, pairs, cfg['scale'])
        ref['teacher'][k] = ev.evaluate(teacher, pairs, cfg['scale'], device)
    with open(path, 'w') as f:
        json.dump(ref, f, indent=1)
    return ref


def job_spec(cfg: dict, ctx: dict, name: str, method: str, mcfg: dict, seed: int, iters: int, threads: int,
             measure: dict | None = None, nominal_iters: int | None = None) -> dict:
    """What :func:`run_job` needs for one (method, seed, iterations) run (``nominal_iters``: the
    length it stands for, e.g. with ``equal_compute``)."""
    return dict(name=name, method=method, method_cfg=mcfg, seed=seed, iters=iters, nominal_iters=nominal_iters,
                upcycle_cache=(ctx.get('upcycle_caches') or {}).get(zoom_in_tiles_of(mcfg)), batch=cfg['train']['batch'],
                lr=cfg['train']['lr'], betas=cfg['train']['betas'], threads=threads, scale=cfg['scale'],
                pool=ctx['pool'], quiz_pool=ctx['quiz_pool'], teacher_cache=ctx['teacher_cache'],
                teacher_layers=list(cfg['kd']['teacher_layers']), student_layers=list(cfg['kd']['student_layers']),
                shapes=ctx['shapes'], student_network=cfg['student']['network'],
                teacher_network=cfg['teacher']['network'], tests=ctx['tests'], val=ctx['val'],
                val_every=cfg['train']['val_every'], log_every=cfg['train'].get('log_every', 100),
                device=ctx.get('device', 'cpu'), teacher_ckpt=ctx['teacher_ckpt'],
                run_dir=str(Path(ctx['out']) / ('measure' if measure else 'runs') / name), measure=measure,
                preload=bool(cfg['train'].get('preload', False)))


def _shapes(cfg: dict) -> dict:
    """Feature shapes of the distillation points (one dummy forward of each network; module names
    and scales checked): what the builders read the channels of the KRNets / regressors from."""
    kd = cfg['kd']
    shapes = probe_pairs(build_net(cfg['teacher']['network']), build_net(cfg['student']['network']),
                         kd['teacher_layers'], kd['student_layers'],
                         keys=dict(teacher_layers='kd.teacher_layers', student_layers='kd.student_layers'))
    return dict(teacher=[list(t) for t in shapes['teacher']], student=[list(t) for t in shapes['student']],
                scale=shapes['scale'])


def execute(specs: list[dict], workers: int, on_done=None) -> list[dict]:
    results = [None] * len(specs)
    if workers <= 0:
        for i, s in enumerate(specs):
            results[i] = run_job(s)
            if on_done:
                on_done(i, results[i])
        return results
    import multiprocessing as mp
    kw = dict(max_workers=workers, mp_context=mp.get_context('spawn'))
    if sys.version_info >= (3, 11):
        kw['max_tasks_per_child'] = 1  # a fresh process per job: clean peak-memory numbers
    with ProcessPoolExecutor(**kw) as ex:
        futs = {ex.submit(run_job, s): i for i, s in enumerate(specs)}
        for fut in as_completed(futs):
            i = futs[fut]
            results[i] = fut.result()
            if on_done:
                on_done(i, results[i])
    return results


def run(config: str | dict, data_root, out, teacher_ckpt: str | None = None, workers: int | None = None,
        threads: int | None = None, budget_min: float | None = None, methods: list[str] | None = None,
        seeds: list[int] | None = None, iters: int | None = None, no_ablations: bool = False,
        plot: bool = True, device: str = 'cpu') -> dict:
    """The whole benchmark (resumable). Returns the results dict (also ``out/results.json``).

    Steps: :func:`apply_overrides` (the command line on the config), :func:`prepare` (pool,
    teacher, caches), :func:`get_plan` (measure and fit the budget, or the stored plan),
    :func:`run_jobs` (every job, finished ones reused), :func:`write_results`.
    """
    t_begin = time.time()
    cfg = copy.deepcopy(config) if isinstance(config, dict) else load_config(config)
    cfg = apply_overrides(cfg, workers=workers, threads=threads, budget_min=budget_min, methods=methods, seeds=seeds,
                          iters=iters, no_ablations=no_ablations)
    data_root, out = Path(data_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bud = cfg['budget']
    workers, threads = bud.get('workers', 2), bud.get('threads', 1)
    main_threads = max(1, workers) * threads
    previous = _read_json(out / 'config.json')  # the last call's config: does a stored plan still stand?
    with open(out / 'config.json', 'w') as f:
        json.dump(cfg, f, indent=1)
    ctx = prepare(cfg, data_root, out, teacher_ckpt, main_threads, device)

    def spec(name, method, mcfg, seed, n_iters, measure=None):
        return job_spec(cfg, ctx, name, method, mcfg, seed, n_iters, threads, measure)

    plan = get_plan(cfg, ctx, out, spec, device, t_begin, previous)
    runs = run_jobs(cfg, plan, spec)
    ref = reference_scores(cfg, ctx, out, main_threads, device)
    return write_results(cfg, ctx, out, plan, runs, ref, plot, t_begin)


def apply_overrides(cfg: dict, workers=None, threads=None, budget_min=None, methods=None, seeds=None, iters=None,
                    no_ablations=False) -> dict:
    """The config with the command line's choices written in (``cfg`` is changed and returned)."""
    bud = cfg.setdefault('budget', {})
    if workers is not None:
        bud['workers'] = workers
    if threads is not None:
        bud['threads'] = threads
    if budget_min is not None:
        bud['minutes'] = budget_min
    if methods:
        unknown = [m for m in methods if m not in cfg['methods']]
        if unknown:
            raise KeyError(f'--methods: {unknown} not in the config\'s methods {sorted(cfg["methods"])}')
        cfg['methods'] = {m: cfg['methods'][m] for m in methods}
    if seeds:
        cfg['train']['seeds'] = list(seeds)
    if iters:
        cfg['train']['iters'] = iters
        cfg['train']['min_iters'] = min(iters, cfg['train'].get('min_iters', iters))
    if no_ablations:
        cfg['ablations'] = None
    return cfg


def _read_json(path: Path):
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def _plan_key(cfg: dict, tpath, device) -> str:
    return _hash(dict(cfg=cfg, teacher=str(tpath), **({'device': device} if device != 'cpu' else {})))


def get_plan(cfg: dict, ctx: dict, out: Path, spec, device, t_begin: float, previous: dict | None = None) -> dict:
    """The stored plan (``out/plan.json``) when it was made for this config, else a new one: a few
    iterations of every method measured (``workers`` jobs at once) and fitted to the budget.

    A plan made for the same config written in the first method-block vocabulary (``previous``:
    the last call's ``config.json``, compared by :func:`~krbench.methods.comparable_config`)
    stands, so a run folder's iterations, and with them its finished runs, are kept."""
    bud, tpath = cfg['budget'], Path(ctx['teacher_ckpt'])
    workers, threads = bud.get('workers', 2), bud.get('threads', 1)
    variants = (cfg.get('ablations') or {}).get('variants') or {}
    plan_path = out / 'plan.json'
    plan_key = _plan_key(cfg, tpath, device)
    plan = _read_json(plan_path)
    if plan is not None and plan.get('key') != plan_key:
        legacy = previous is not None and plan.get('key') == _plan_key(previous, tpath, device) and \
            _as_json(comparable_config(previous)) == _as_json(comparable_config(cfg))
        plan = dict(plan, key=plan_key) if legacy else None
        if legacy:
            with open(plan_path, 'w') as f:
                json.dump(plan, f, indent=1)
    if plan is None:
        mcfg = dict(cfg.get('measure', {}))
        mi, mm = mcfg.get('iters', 6), mcfg.get('meta_steps', 2)
        todo = [(m, mc) for m, mc in cfg['methods'].items()]
        todo += [(f'abl_{v}', _ablation_cfg(cfg, vc, v)) for v, vc in variants.items()]
        specs = [spec(n, n, mc, 0, mi + mm + 1, dict(iters=mi + mm, meta=mm if meta_every(mc) else 0, warmup=1))
                 for n, mc in todo]
        log(f'measuring {len(specs)} methods ({mi} plain + {mm} meta iterations each, {workers} x {threads}-thread '
            'jobs)')
        meas = {specs[i]['name']: r for i, r in enumerate(execute(specs, workers))}
        for n, r in meas.items():
            log(f'  {n:24s} step {r["t_step"]:.3f} s' + (f', meta step {r["t_meta"]:.3f} s' if r['t_meta'] else ''))
        overhead = time.time() - t_begin + bud.get('eval_seconds', 0)
        plan = make_plan(cfg, meas, overhead)
        plan.update(key=plan_key, measured=meas)
        with open(plan_path, 'w') as f:
            json.dump(plan, f, indent=1)
    log(f'PLAN: {len(plan["jobs"])} jobs, {plan["iters"]} iterations per student run'
        + (f', ablations {plan["ablation_iters"]} iterations' if variants else '')
        + f', predicted {plan["predicted_total_min"]:.0f} min in all ({plan["workers"]} workers x {threads} thread)')
    for j in plan['jobs']:
        log(f'  {j["name"]:22s} seed {j["seed"]} iters {j["iters"]:5d} predicted {j["predicted_s"] / 60:5.1f} min')
    return plan


def run_jobs(cfg: dict, plan: dict, spec) -> dict:
    """Every (method, seed) job at the plan's iterations, then the ablations; longest first,
    finished runs reused (:func:`reusable`), progress and ETA logged. Returns ``{name: result}``."""
    abl = cfg.get('ablations') or {}
    workers = cfg['budget'].get('workers', 2)
    specs = []
    for m, mc in cfg['methods'].items():
        for s in cfg['train']['seeds']:
            specs.append(spec(f'{m}_s{s}_i{plan["iters"]}', m, mc, s, plan['iters']))
    for v, vc in (abl.get('variants') or {}).items():
        s = abl.get('seed', 0)
        specs.append(spec(f'abl_{v}_s{s}_i{plan["ablation_iters"]}', f'abl_{v}', _ablation_cfg(cfg, vc, v), s,
                          plan['ablation_iters']))
    pred = {j['name']: j['predicted_s'] for j in plan['jobs']}
    costs = [pred.get(s_['method'], 1.0) for s_ in specs]
    order = sorted(range(len(specs)), key=lambda i: (specs[i]['method'].startswith('abl_'), -costs[i]))
    specs = [specs[i] for i in order]
    costs = [costs[i] for i in order]
    done_before = [i for i, s_ in enumerate(specs) if reusable(s_, log)]
    if done_before:
        log(f'resuming: {len(done_before)} of {len(specs)} runs already finished (reused, not retrained)')
    remaining = sum(c for i, c in enumerate(costs) if i not in done_before)
    t_jobs = time.time()
    state = dict(left=remaining, n=len(done_before))

    def on_done(i, r):
        if i in done_before:
            return
        state['left'] -= costs[i]
        state['n'] += 1
        el = time.time() - t_jobs
        done_cost = remaining - state['left']
        eta = el / done_cost * state['left'] if done_cost > 0 else float('nan')
        log(f'[{state["n"]}/{len(specs)}] {specs[i]["name"]} finished; elapsed {el / 60:.1f} min, '
            f'ETA {eta / 60:.1f} min (finish ~{time.strftime("%H:%M", time.localtime(time.time() + eta))})')

    results = execute(specs, workers, on_done)
    for s_, r in zip(specs, results):
        r['_dir'] = s_['run_dir']
    return {s_['name']: r for s_, r in zip(specs, results)}


def write_results(cfg: dict, ctx: dict, out: Path, plan: dict, runs: dict, ref: dict, plot: bool, t_begin: float
                  ) -> dict:
    """The summary: ``results.json``, ``results.md`` (printed), ``curves.png`` and ``visual.png``."""
    summary = summarize(cfg, plan, runs, ref)
    with open(out / 'results.json', 'w') as f:
        json.dump(dict(summary=summary, runs=runs, reference=ref, plan=plan), f, indent=1)
    md = format_markdown(summary)
    (out / 'results.md').write_text(md)
    if plot:
        plot_curves(summary, runs, out / 'curves.png')
        plot_visual(cfg, summary, runs, ctx['tests'], out / 'visual.png', cfg['scale'])
    log(f'done in {(time.time() - t_begin) / 60:.1f} min; {out / "results.md"}')
    print(md, flush=True)
    return dict(summary=summary, runs=runs, reference=ref, plan=plan)


# ============================================================================================ summary
def mean_std(vals):
    vals = np.asarray(vals, np.float64)
    return dict(mean=float(vals.mean()), std=float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, n=len(vals),
                values=[float(v) for v in vals])


def summarize(cfg, plan, runs, ref) -> dict:
    tests = list(cfg['data']['test'])
    by_method: dict[str, list] = {}
    for r in runs.values():
        by_method.setdefault(r['method'], []).append(r)
    rows = [dict(method='bicubic', **{f'{t}_{k}': mean_std([ref['bicubic'][t][k]]) for t in tests for k in ('psnr', 'ssim')}),
            dict(method='teacher', params=ref['teacher_params'],
                 **{f'{t}_{k}': mean_std([ref['teacher'][t][k]]) for t in tests for k in ('psnr', 'ssim')})]
    alone = {r['seed']: r for r in by_method.get('student_alone', [])}
    paired = {}
    for m in cfg['methods']:
        rs = sorted(by_method.get(m, []), key=lambda r: r['seed'])
        if not rs:
            continue
        row = dict(method=m, seeds=[r['seed'] for r in rs], iters=rs[0]['iters'], params=rs[0]['params'],
                   s_per_iter=mean_std([r['s_per_iter'] for r in rs]), peak_rss_mib=max(r['peak_rss_mib'] for r in rs))
        for t in tests:
            for k in ('psnr', 'ssim'):
                row[f'{t}_{k}'] = mean_std([r['tests'][t][k] for r in rs])
        if m != 'student_alone' and alone:
            paired[m] = {t: mean_std([r['tests'][t]['psnr'] - alone[r['seed']]['tests'][t]['psnr'] for r in rs
                                 if r['seed'] in alone]) for t in tests}
        ml = [x for r in rs for x in r.get('meta_log', []) if x.get('grad_norm') is not None]
        if ml:
            row['meta_grad_norm'] = float(np.median([x['grad_norm'] for x in ml]))
        rows.append(row)
    abl_rows = []
    for r in sorted(runs.values(), key=lambda r: r['method']):
        if not r['method'].startswith('abl_'):
            continue
        ab = dict(variant=r['method'][4:], iters=r['iters'], seed=r['seed'], s_per_iter=r['s_per_iter'],
                  **{t: r['tests'][t]['psnr'] for t in tests})
        last = r['stats'][-1] if r.get('stats') else {}
        for k in ('weight_entropy', 'kernel_abs_cos', 'texture_gain'):
            if k in last:
                ab[k] = float(np.mean(last[k]))
        gn = [x['grad_norm'] for x in r.get('meta_log', []) if x.get('grad_norm') is not None]
        if gn:
            ab['meta_grad_norm'] = float(np.median(gn))
        if 'l_texture' in last:
            ab['l_texture'] = last['l_texture']
        abl_rows.append(ab)
    hand = [r for r in rows if r['method'] in HANDCRAFTED]
    meta = [r for r in rows if r['method'].startswith('metakd')]
    score = lambda r: np.mean([r[f'{t}_psnr']['mean'] for t in tests])  # noqa: E731
    best_base = max(hand, key=score)['method'] if hand else None
    best_meta = max(meta, key=score)['method'] if meta else None
    targets = {}
    if best_meta and alone:
        mrow = next(r for r in rows if r['method'] == best_meta)
        arow = next(r for r in rows if r['method'] == 'student_alone')
        brow = next((r for r in rows if r['method'] == best_base), None)
        for t in tests:
            d_alone = mrow[f'{t}_psnr']['mean'] - arow[f'{t}_psnr']['mean']
            d_base = mrow[f'{t}_psnr']['mean'] - brow[f'{t}_psnr']['mean'] if brow else None
            spread = max(mrow[f'{t}_psnr']['std'], arow[f'{t}_psnr']['std'], brow[f'{t}_psnr']['std'] if brow else 0)
            targets[t] = dict(vs_alone=d_alone, vs_best_baseline=d_base, spread=spread,
                              met=bool(d_alone >= 0.15 and (d_base is None or d_base >= 0.05)
                                       and min(d_alone, d_base if d_base is not None else d_alone) > spread))
    return dict(tests=tests, rows=rows, paired=paired, ablations=abl_rows, best_baseline=best_base,
                best_metakd=best_meta, targets=targets, iters=plan['iters'], ablation_iters=plan['ablation_iters'])


def plus_minus(d, fmt='{:.3f}'):
    if d['n'] > 1:
        return (fmt + ' ± ' + fmt).format(d['mean'], d['std'])
    return fmt.format(d['mean'])


def format_markdown(s: dict) -> str:
    tests = s['tests']
    header = ['method'] + [f'{t} PSNR' for t in tests] + [f'{t} SSIM' for t in tests] + \
        ['params', 's/iter', 'peak RSS (MiB)', 'seeds']
    rows = []
    for r in s['rows']:
        rows.append([METHOD_LABELS.get(r['method'], r['method'])] + [plus_minus(r[f'{t}_psnr']) for t in tests] +
                    [plus_minus(r[f'{t}_ssim'], '{:.4f}') for t in tests] +
                    [f'{r["params"] / 1e6:.3f} M' if r.get('params') else '–',
                     plus_minus(r['s_per_iter']) if 's_per_iter' in r else '–',
                     f'{r["peak_rss_mib"]:.0f}' if 'peak_rss_mib' in r else '–', len(r.get('seeds', [])) or '–'])
    out = [f'Student runs: {s["iters"]} iterations each; mean ± std over seeds (std with ddof=1).', '',
           ev.markdown_table(header, rows), '']
    if s['paired']:
        out += ['Paired differences against the same-seed student alone (Y-PSNR, dB; mean ± std over seeds):', '',
                ev.markdown_table(['method'] + tests, [[METHOD_LABELS.get(m, m)] + [plus_minus(d[t], '{:+.3f}') for t in tests]
                                                       for m, d in s['paired'].items()]), '']
    if s['targets']:
        out += [f'Targets for {METHOD_LABELS.get(s["best_metakd"])} (best hand-crafted: '
                f'{METHOD_LABELS.get(s["best_baseline"])}):', '',
                ev.markdown_table(['set', 'vs alone (>= +0.15)', 'vs best baseline (>= +0.05)', 'seed spread', 'met'],
                                  [[t, f'{d["vs_alone"]:+.3f}',
                                    f'{d["vs_best_baseline"]:+.3f}' if d['vs_best_baseline'] is not None else '–',
                                    f'{d["spread"]:.3f}', 'yes' if d['met'] else 'no']
                                   for t, d in s['targets'].items()]), '']
    if s['ablations']:
        keys = ['weight_entropy', 'kernel_abs_cos', 'texture_gain', 'meta_grad_norm', 'l_texture']
        out += [f'Ablations (1 seed, {s["ablation_iters"]} iterations; Y-PSNR dB):', '',
                ev.markdown_table(['variant'] + tests + ['s/iter'] + keys,
                                  [[a['variant']] + [f'{a[t]:.3f}' for t in tests] + [f'{a["s_per_iter"]:.3f}'] +
                                   [f'{a[k]:.3g}' if k in a else '–' for k in keys] for a in s['ablations']]), '']
    return '\n'.join(out)


# ============================================================================================ plots
def plot_curves(s: dict, runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    by: dict[str, list] = {}
    for r in runs.values():
        if not r['method'].startswith('abl_') and r.get('curve'):
            by.setdefault(r['method'], []).append(r['curve'])
    for m, curves in by.items():
        its = [c['it'] for c in curves[0]]
        n = min(len(c) for c in curves)
        v = np.array([[p['psnr'] for p in c[:n]] for c in curves])
        line, = ax.plot(its[:n], v.mean(0), label=METHOD_LABELS.get(m, m), lw=1.2)
        if len(curves) > 1:
            ax.fill_between(its[:n], v.min(0), v.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel('iteration')
    ax.set_ylabel('validation Y-PSNR (dB)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    all_v = [p['psnr'] for cs in by.values() for c in cs for p in c]
    if all_v:
        hi = max(all_v)
        ax.set_ylim(max(min(all_v), hi - 2.0), hi + 0.1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _best_crop(hr: np.ndarray, bic: np.ndarray, size: int) -> tuple[int, int]:
    err = np.abs(hr.astype(np.float32) - bic.astype(np.float32)).mean(2)
    h, w = err.shape
    size = min(size, h, w)
    best, pos = -1, (0, 0)
    for y in range(0, h - size + 1, max(1, size // 4)):
        for x in range(0, w - size + 1, max(1, size // 4)):
            e = err[y:y + size, x:x + size].mean()
            if e > best:
                best, pos = e, (y, x)
    return pos


def plot_visual(cfg: dict, s: dict, runs: dict, tests: dict, path: Path, scale: int) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    vis = cfg.get('visual', {})
    size = vis.get('crop', 96)
    seed = min(r['seed'] for r in runs.values())
    cols = [('HR', None), ('bicubic', 'bicubic'), ('student alone', 'student_alone')]
    if s['best_baseline']:
        cols.append((METHOD_LABELS.get(s['best_baseline'], s['best_baseline']), s['best_baseline']))
    if s['best_metakd']:
        cols.append((METHOD_LABELS.get(s['best_metakd'], s['best_metakd']), s['best_metakd']))
    nets = {}
    for _, m in cols:
        if m and m != 'bicubic':
            r = next((r for r in runs.values() if r['method'] == m and r['seed'] == seed), None)
            if r is not None:
                nets[m] = ev.load_network(build_net(r['network']), Path(r['_dir']) / 'student.pth') if '_dir' in r \
                    else None
    images = vis.get('images')
    chosen = []
    for t, tc in tests.items():
        pairs = ev.load_pairs(tc['hr'], scale, tc['lr'])
        for p in pairs:
            if images is None or f'{t}/{p["name"]}' in images:
                chosen.append((t, p))
    if images is None:
        chosen = chosen[:3]
    if not chosen:
        log(f'visual: none of visual.images {images} is in the test sets ({", ".join(tests)}; names are '
            f'"<set>/<image stem>"): no {path.name}')
        return
    fig, axes = plt.subplots(len(chosen), len(cols), figsize=(1.6 * len(cols), 1.75 * len(chosen)), dpi=90,
                             squeeze=False)
    for i, (t, p) in enumerate(chosen):
        bic = ev.bicubic_upscale(p['lr'], scale)
        y, x = _best_crop(p['hr'], bic, size)
        for j, (label, m) in enumerate(cols):
            if m is None:
                img = p['hr']
            elif m == 'bicubic':
                img = bic
            elif nets.get(m) is not None:
                img = ev.super_resolve(nets[m], p['lr'])
            else:
                img = np.zeros_like(p['hr'])
            crop = img[y:y + size, x:x + size]
            ax = axes[i, j]
            ax.imshow(crop[:, :, ::-1], interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if m is not None:
                ps, _ = ev.y_psnr_ssim(img, p['hr'], scale)
                ax.set_xlabel(f'{ps:.2f} dB', fontsize=7)
            if i == 0:
                ax.set_title(label, fontsize=7)
            if j == 0:
                ax.set_ylabel(f'{t}/{p["name"]}', fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ============================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='MetaKD vs hand-crafted KD benchmark (resumable; see BENCHMARKS.md).')
    p.add_argument('-opt', '--config', required=True, help='benchmark config YAML (options/bench/*.yml)')
    p.add_argument('--data-root', required=True, help='folder holding the data sets named in the config')
    p.add_argument('--out', required=True, help='run folder (reused on a second call: finished runs are kept)')
    p.add_argument('--teacher', default=None, help='teacher checkpoint ({"params": ...}); default: config '
                   'teacher.checkpoint, else train one with teacher.train')
    p.add_argument('--workers', type=int, default=None, help='parallel worker processes (0: in-process)')
    p.add_argument('--threads', type=int, default=None, help='torch threads per worker')
    p.add_argument('--budget-min', type=float, default=None, help='wall-time budget (minutes) for the plan')
    p.add_argument('--methods', nargs='+', default=None, help='subset of the config methods')
    p.add_argument('--seeds', nargs='+', type=int, default=None)
    p.add_argument('--iters', type=int, default=None, help='iterations per student run (upper bound of the plan)')
    p.add_argument('--no-ablations', action='store_true')
    p.add_argument('--device', default='cpu', help="torch device of the training jobs, e.g. 'cuda' (default cpu); "
                   'workers then share the device')
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    return run(a.config, a.data_root, a.out, teacher_ckpt=a.teacher, workers=a.workers, threads=a.threads,
               budget_min=a.budget_min, methods=a.methods, seeds=a.seeds, iters=a.iters, no_ablations=a.no_ablations,
               device=a.device)


if __name__ == '__main__':
    main()
