"""Step cost: time and peak memory of one training iteration, per distillation method.

Every method is a real BasicSR model built with ``build_model`` from an option dict
(``SRModel`` for the student alone, ``KDSRModel`` for output KD / FitNet / FAKD / AT,
``MetaKDModel`` for MetaKD) on the same teacher/student pair and the same random batch, and
``model.optimize_parameters(it)`` is timed. Ratios are taken against the student-alone row
(and the output-KD row) of the same run. CLI: ``tools/step_cost.py`` (see ``--help``)::

    python tools/step_cost.py --threads 2 --json step_cost.json             # CPU pair, all methods
    python tools/step_cost.py --preset edsr-l --device cuda --gt-size 192     # EDSR-L -> EDSR on a GPU

Measurement (written into the JSON as ``config.memory_method``):

* **time**: ``time.perf_counter`` around each ``optimize_parameters`` call
  (``torch.cuda.synchronize`` before and after on CUDA) of ``iters`` timed iterations numbered
  ``1..iters``, after ``warmup`` iterations numbered 0 (a meta iteration whatever ``every`` is,
  so the meta path is warm too). A *cycle* is 4 iterations when an every-4 method is in the run
  (1 otherwise; ``iters`` is rounded up to whole cycles), so ``meta.every: 4`` is averaged over
  whole cycles. ``s/iter`` is by default the lowest cycle mean (``--stat best``, like
  ``timeit``'s minimum: other load on a shared machine only adds time), or the mean of all
  timed iterations (``--stat mean``); both are in the JSON.
* **peak memory** ("step memory"): the peak during the timed steps minus what was resident
  before the first (warm-up) step, i.e. activations, autograd graphs (double backward
  included), gradients and optimizer state; the weights of student, teacher and KRNets are not
  in it. The warm-up is left out of the peak because ``cudnn.benchmark`` (on, as in BasicSR's
  ``train.py``) tries algorithms with large transient workspaces there. On CUDA:
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` (after the warm-up) minus
  ``memory_allocated`` before the warm-up (``peak_abs_mb`` is the plain
  ``max_memory_allocated``, weights included). On CPU: peak RSS minus RSS before the warm-up,
  each method in a fresh subprocess (``python -m krbench.step_cost --one METHOD ...``) so
  methods do not share an allocator; the peak is ``VmHWM`` reset after the warm-up through
  ``/proc/self/clear_refs``, or ``ru_maxrss`` (KiB on Linux; then the warm-up and the model
  build are in it) where that reset is not allowed.
* **phases**: ``teacher_forward``, ``student_forward``, ``kd_terms`` (FitNet regressors, FAKD
  affinities, KRNets + texture loss: forward only) and the meta step are timed by wrapping the
  algorithm's methods (with a CUDA sync); inside the meta step the student forwards, KD terms
  and the autograd calls of :mod:`krdistill.meta` (``create_graph`` or not) are timed the same
  way. ``step.rest`` is the remainder: loss sums, the student backward and the optimizer steps.
  The model's own ``t_meta`` log is reported beside it (``t_meta_model``; on CUDA it is taken
  without a sync, so it is only indicative there).

* **schedule** (one subprocess per method): all models are built first; then the timed cycles
  go round the methods, one process running at a time, so that background load on a shared
  machine hits every method alike (``--schedule interleaved``, default); ``sequential`` runs
  one method after the other.
* ``--kr KEY=VALUE`` changes KRNet options.

A random teacher is fine for timing; it is written to a temporary checkpoint because the
models load ``path.pretrain_network_t``. Results: BENCHMARKS.md, section "Step cost".
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

import krdistill  # noqa: F401  (shims before basicsr, registers models / archs / losses)

from .memprobe import reset_peak_rss, status_kib

__all__ = ['PRESETS', 'METHODS', 'DEFAULT_METHODS', 'make_config', 'build_options', 'measure_method', 'run',
           'format_table', 'format_phases', 'check_targets', 'build_parser', 'parse_kr', 'main', 'worker_main', 'MARK']

_EDSR = dict(type='EDSR', num_in_ch=3, num_out_ch=3, res_scale=1, img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])
_KRNET = dict(type='KRNet', width=64, num_kernels=8, kernel_size=3, corr_radius=1, use_correlation=True,
              dynamic=True, per_pixel=False, hidden=64, fitnet_branch=False)

#: arch pairs: teacher / student options (``upscale`` = ``scale``), distillation points, KRNet options
PRESETS = OrderedDict([
    ('edsr', dict(
        description='teacher EDSR 64ch/16 blocks -> student EDSR 16ch/4 blocks, x4 (the CPU benchmark pair)',
        scale=4,
        teacher=dict(_EDSR, num_feat=64, num_block=16),
        student=dict(_EDSR, num_feat=16, num_block=4),
        teacher_layers=['body.7', 'body.15'], student_layers=['body.1', 'body.3'],
        krnet=dict(_KRNET))),
    ('edsr-l', dict(
        description='teacher EDSR-L 256ch/32 blocks -> student EDSR 64ch/16 blocks, x4 (options/metakd_edsr_x4.yml)',
        scale=4,
        teacher=dict(_EDSR, num_feat=256, num_block=32, res_scale=0.1),
        student=dict(_EDSR, num_feat=64, num_block=16),
        teacher_layers=['body.7', 'body.15', 'body.23', 'body.31'],
        student_layers=['body.3', 'body.7', 'body.11', 'body.15'],
        krnet=dict(_KRNET))),
    ('tiny', dict(
        description='teacher EDSR 16ch/2 blocks -> student EDSR 8ch/1 block, x2 (tests)',
        scale=2,
        teacher=dict(_EDSR, num_feat=16, num_block=2),
        student=dict(_EDSR, num_feat=8, num_block=1),
        teacher_layers=['body.1'], student_layers=['body.0'],
        krnet=dict(_KRNET, width=8, num_kernels=4, hidden=8))),
])

#: method -> (model type, what is added to the student's L1 objective)
METHODS = OrderedDict([
    ('student', dict(model_type='SRModel', label='student alone (L1)')),
    ('output_kd', dict(model_type='KDSRModel', label='output KD (L1 to teacher SR)')),
    ('fitnet', dict(model_type='KDSRModel', label='FitNet (1x1 regressor, L1)')),
    ('fakd', dict(model_type='KDSRModel', label='FAKD (spatial affinity, weight 10)')),
    ('at', dict(model_type='KDSRModel', label='AT (attention transfer)')),
    ('metakd_exact_every1', dict(model_type='MetaKDModel', label='MetaKD exact, every 1',
                                 meta=dict(mode='exact', every=1))),
    ('metakd_exact_every4', dict(model_type='MetaKDModel', label='MetaKD exact, every 4',
                                 meta=dict(mode='exact', every=4))),
    ('metakd_fd_every1', dict(model_type='MetaKDModel', label='MetaKD finite_difference, every 1',
                              meta=dict(mode='finite_difference', every=1))),
    ('metakd_fd_every4', dict(model_type='MetaKDModel', label='MetaKD finite_difference, every 4',
                              meta=dict(mode='finite_difference', every=4))),
])
DEFAULT_METHODS = [m for m in METHODS if m != 'at']

#: the issue's targets: (rows, baseline, limit, quantity)
TARGETS = [
    (('metakd_exact_every4', 'metakd_fd_every4'), 'output_kd', 1.5, 'time'),
    (('metakd_exact_every1',), 'output_kd', 3.5, 'time'),
    (('metakd_exact_every1', 'metakd_exact_every4', 'metakd_fd_every1', 'metakd_fd_every4'), 'output_kd', 2.0,
     'memory'),
]

DEFAULTS = dict(preset='edsr', batch=16, gt_size=96, iters=10, warmup=2, threads=None, device='cpu', seed=0,
                teacher_ckpt=None, teacher_param_key='params', kr=None, lr=1e-4,
                stat='best')


# ---------------------------------------------------------------------------- options
def make_config(**kwargs) -> dict:
    """A complete run configuration (``DEFAULTS`` updated with ``kwargs``), validated."""
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise KeyError(f'step_cost: unknown setting(s) {unknown}; allowed: {sorted(DEFAULTS)}')
    cfg = dict(DEFAULTS, **kwargs)
    if cfg['preset'] not in PRESETS:
        raise ValueError(f'--preset: {cfg["preset"]!r} is not one of {list(PRESETS)}')
    scale = PRESETS[cfg['preset']]['scale']
    if cfg['gt_size'] % scale:
        raise ValueError(f'--gt-size: {cfg["gt_size"]} is not a multiple of the scale x{scale}')
    for k in ('batch', 'gt_size', 'iters'):
        if int(cfg[k]) < 1:
            raise ValueError(f'--{k.replace("_", "-")}: must be >= 1, got {cfg[k]}')
    if int(cfg['warmup']) < 0:
        raise ValueError(f'--warmup: must be >= 0, got {cfg["warmup"]}')
    if cfg['stat'] not in ('best', 'mean'):
        raise ValueError(f'--stat: best or mean, got {cfg["stat"]!r}')
    if cfg['device'] not in ('cpu', 'cuda'):
        raise ValueError(f'--device: cpu or cuda, got {cfg["device"]!r}')
    if cfg['device'] == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda: torch.cuda.is_available() is False on this machine')
    return cfg


def _method_spec(method: str) -> dict:
    if method not in METHODS:
        raise ValueError(f'--methods: {method!r} is not one of {list(METHODS)}')
    return METHODS[method]


def build_options(method: str, cfg: dict, teacher_ckpt: str, root: str) -> dict:
    """The BasicSR option dict of ``method`` for the run configuration ``cfg``."""
    spec = _method_spec(method)
    preset = PRESETS[cfg['preset']]
    scale, lq_size = preset['scale'], cfg['gt_size'] // preset['scale']
    student = dict(copy.deepcopy(preset['student']), upscale=scale)
    teacher = dict(copy.deepcopy(preset['teacher']), upscale=scale)
    exp = os.path.join(root, 'experiments', method)
    train = dict(
        ema_decay=0, optim_g=dict(type='Adam', lr=cfg['lr'], weight_decay=0, betas=[0.9, 0.99]),
        scheduler=dict(type='MultiStepLR', milestones=[10 ** 9], gamma=0.5), total_iter=10 ** 9, warmup_iter=-1,
        pixel_opt=dict(type='L1Loss', loss_weight=1.0, reduction='mean'))
    opt = dict(
        name=f'step_cost_{method}', model_type=spec['model_type'], scale=scale,
        num_gpu=1 if cfg['device'] == 'cuda' else 0, manual_seed=cfg['seed'], is_train=True, dist=False, rank=0,
        world_size=1, auto_resume=False, root_path=root, network_g=student,
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None, experiments_root=exp,
                  models=os.path.join(exp, 'models'), training_states=os.path.join(exp, 'training_states'),
                  log=exp, visualization=os.path.join(exp, 'visualization')),
        train=train,
        logger=dict(print_freq=10 ** 9, save_checkpoint_freq=10 ** 9, use_tb_logger=False))
    if spec['model_type'] == 'SRModel':
        return opt
    opt['network_t'] = teacher
    opt['path'].update(pretrain_network_t=teacher_ckpt, param_key_t=cfg['teacher_param_key'], strict_load_t=True,
                       ignore_resume_networks=['network_t'])
    points = dict(teacher_layers=list(preset['teacher_layers']), student_layers=list(preset['student_layers']))
    if method == 'output_kd':
        opt['kd'] = dict(teacher_layers=[], student_layers=[])
        train['output_kd_opt'] = dict(type='OutputKDLoss', loss_weight=1.0, criterion='l1')
    elif method == 'fitnet':
        opt['kd'] = points
        train['kd_opt'] = dict(type='FitNetLoss', loss_weight=1.0, criterion='l1', reduction='mean')
    elif method == 'fakd':
        opt['kd'] = points  # max_size = the LR patch: exact FAKD, as options/train/kd/train_KD_FAKD_*.yml
        train['kd_opt'] = dict(type='FAKDLoss', loss_weight=10.0, max_size=lq_size, criterion='l1')
    elif method == 'at':
        opt['kd'] = points
        train['kd_opt'] = dict(type='ATLoss', loss_weight=1.0)
    else:  # MetaKD, as options/metakd_edsr_x4.yml (texture loss only, no output-KD term)
        opt['kd'] = points
        kr = copy.deepcopy(preset['krnet'])
        for k, v in (cfg.get('kr') or {}).items():
            if k in ('type', 's_channels', 't_channels'):
                raise KeyError(f'--kr: {k} cannot be overridden')
            kr[k] = v
        opt['network_kr'] = kr
        train['texture_opt'] = dict(type='TextureWiseLoss', loss_weight=1.0, criterion='l1')
        train['optim_kr'] = dict(type='Adam', lr=cfg['lr'], betas=[0.9, 0.999])
        opt['meta'] = dict(dict(every=1, mode='exact', update='meta', objective='one_step', fd_eps=0.01),
                           **spec['meta'])
    return opt


def write_random_teacher(cfg: dict, path: str) -> str:
    """A checkpoint ``{'params': state_dict}`` of the preset's teacher with random weights."""
    from basicsr.archs import build_network
    preset = PRESETS[cfg['preset']]
    torch.manual_seed(cfg['seed'])
    net = build_network(dict(copy.deepcopy(preset['teacher']), upscale=preset['scale']))
    torch.save({cfg['teacher_param_key']: net.state_dict()}, path)
    return path


def make_batch(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The random batch every method gets: ``lq`` B x 3 x gt/s x gt/s and ``gt`` B x 3 x gt x gt in [0, 1]."""
    scale = PRESETS[cfg['preset']]['scale']
    g = torch.Generator().manual_seed(cfg['seed'] + 1)
    gt = torch.rand(cfg['batch'], 3, cfg['gt_size'], cfg['gt_size'], generator=g)
    lq = torch.nn.functional.avg_pool2d(gt, scale)  # a plausible LR of the GT (content is irrelevant to cost)
    return lq, gt


# ---------------------------------------------------------------------------- memory probes
def _rss_kib() -> int:
    rss = status_kib('VmRSS')
    if rss is not None:
        return rss
    # no /proc (not Linux): ru_maxrss is the best available (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == 'darwin' else r


def _peak_rss_kib(reset_ok: bool) -> int:
    if reset_ok:
        hwm = status_kib('VmHWM')
        if hwm is not None:
            return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == 'darwin' else r  # Linux: KiB


# ---------------------------------------------------------------------------- phase timers
class _PhaseTimer:
    """Accumulates seconds per phase name, timed through the algorithm's phase hook (:meth:`phase`)."""

    def __init__(self, device: str):
        self.cuda = device == 'cuda'
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.cycles: list[dict[str, float]] = []  # per-cycle totals (see ``new_cycle``)
        self.in_meta = False
        self.on = False

    def new_cycle(self):
        self.cycles.append({})

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def add(self, name: str, seconds: float):
        if self.on:
            self.totals[name] = self.totals.get(name, 0.0) + seconds
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.cycles:
                self.cycles[-1][name] = self.cycles[-1].get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str):
        """The algorithm's phase hook (``Distiller.set_phase_hook``): (CUDA-synchronised) seconds per
        phase; ``student_forward`` / ``kd_terms`` / ``autograd*`` inside the meta step are ``meta.*``,
        outside it ``step.*``."""
        if name in ('teacher_forward', 'meta_step'):
            key = name
        else:
            key = ('meta.' if self.in_meta else 'step.') + name
        entered = name == 'meta_step' and not self.in_meta
        self.sync()
        t0 = time.perf_counter()
        if entered:
            self.in_meta = True
        try:
            yield
        finally:
            if entered:
                self.in_meta = False
            self.sync()
            self.add(key, time.perf_counter() - t0)


@contextmanager
def _instrument(model, timer: _PhaseTimer):
    """Time the phases of ``model``'s algorithm through its phase hook (no code is replaced)."""
    dist = getattr(model, 'distiller', None)
    if dist is None:
        yield
        return
    dist.set_phase_hook(timer.phase)
    try:
        yield
    finally:
        dist.set_phase_hook(None)


def _phases_per_iter(totals: dict, counts: dict | None, total: float, iters: int) -> dict:
    """Seconds per iteration by phase; ``meta.other`` and ``step.rest`` are the remainders."""
    t = {k: v / iters for k, v in totals.items()}
    out = OrderedDict()
    out['teacher_forward'] = t.get('teacher_forward', 0.0)
    out['step.student_forward'] = t.get('step.student_forward', 0.0)
    out['step.kd_terms'] = t.get('step.kd_terms', 0.0)
    if 'meta_step' in t:
        out['meta_step'] = t['meta_step']
        for k in ('meta.student_forward', 'meta.kd_terms', 'meta.autograd_create_graph', 'meta.autograd'):
            out[k] = t.get(k, 0.0)
        out['meta.other'] = t['meta_step'] - sum(t.get(k, 0.0) for k in (
            'meta.student_forward', 'meta.kd_terms', 'meta.autograd_create_graph', 'meta.autograd'))
    known = out['teacher_forward'] + out['step.student_forward'] + out['step.kd_terms'] + out.get('meta_step', 0.0)
    out['step.rest'] = total / iters - known
    if counts is not None:
        out['calls_per_iter'] = {k: counts[k] / iters for k in sorted(counts)}
    return out


# ---------------------------------------------------------------------------- one method
class _Bench:
    """One method's model on the run's batch, stepped cycle by cycle (see :func:`measure_method`)."""

    def __init__(self, method: str, cfg: dict, teacher_ckpt: str | None, cycle: int = 4):
        cfg = make_config(**cfg)
        if cycle < 1 or cfg['iters'] % cycle:
            raise ValueError(f'measure_method: iters {cfg["iters"]} is not a multiple of the cycle {cycle}')
        from basicsr.models import build_model
        from basicsr.utils import get_root_logger
        import logging
        get_root_logger(log_level=logging.WARNING)
        self.method, self.cfg, self.cycle = method, cfg, cycle
        self.device = torch.device(cfg['device'])
        self.cuda = self.device.type == 'cuda'
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # as basicsr/train.py
        self._tmp = tempfile.TemporaryDirectory(prefix='step_cost_')
        torch.manual_seed(cfg['seed'])
        self.model = build_model(build_options(method, cfg, teacher_ckpt, self._tmp.name))
        lq, gt = make_batch(cfg)
        self.model.feed_data({'lq': lq, 'gt': gt})  # moves to the model's device
        self.timer = _PhaseTimer(cfg['device'])
        self.times, self.t_meta, self.next_it, self.reset_ok = [], [], 1, True
        gc.collect()
        if self.cuda:
            # cuBLAS / cuBLASLt keep a workspace per handle from their first call on (KRNet's heads are
            # the first matmuls of a run): allocate it now, so that it is in every method's base
            x = torch.ones(8, 8, device=self.device)
            torch.nn.functional.linear(x, x, x[0]).sum().item()
            del x
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_kib() * 1024
        self._stack = ExitStack()
        self._stack.enter_context(_instrument(self.model, self.timer))

    def _step(self, it: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.model.optimize_parameters(it)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def warmup(self) -> None:
        for _ in range(self.cfg['warmup']):
            self._step(0)  # iteration 0: a meta iteration whatever meta.every is
        # the peak is taken over the timed iterations only: cudnn.benchmark's autotuning in the
        # warm-up allocates large transient workspaces that training never holds again
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_ok = reset_peak_rss()
        self.timer.on = True

    def run_cycle(self) -> float:
        """``cycle`` timed iterations; returns their seconds."""
        self.timer.new_cycle()
        t = 0.0
        for _ in range(self.cycle):
            dt = self._step(self.next_it)
            self.next_it += 1
            self.times.append(dt)
            t += dt
            if 't_meta' in self.model.log_dict:
                self.t_meta.append(float(self.model.log_dict['t_meta']))
        return t

    def finish(self) -> dict:
        self._stack.close()
        if self.cuda:
            peak_abs = torch.cuda.max_memory_allocated(self.device)
        else:
            peak_abs = _peak_rss_kib(self.reset_ok) * 1024
        model = self.model
        losses = {k: float(v) for k, v in model.log_dict.items() if k.startswith('l_')}
        n_params = sum(p.numel() for p in model.net_g.parameters())
        del model
        self.model = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        self._tmp.cleanup()
        times, cycle, base = self.times, self.cycle, self.base
        total = sum(times)
        cycle_times = [sum(times[i:i + cycle]) for i in range(0, len(times), cycle)]
        best = min(range(len(cycle_times)), key=cycle_times.__getitem__)
        return OrderedDict(
            method=self.method, label=METHODS[self.method]['label'], s_per_iter_mean=total / len(times),
            s_per_iter_best=cycle_times[best] / cycle, cycle=cycle, iter_times=times,
            peak_mb=max(peak_abs - base, 0) / 2 ** 20, peak_abs_mb=peak_abs / 2 ** 20, base_mb=base / 2 ** 20,
            phases_best=_phases_per_iter(self.timer.cycles[best], None, cycle_times[best], cycle),
            phases_mean=_phases_per_iter(self.timer.totals, self.timer.counts, total, len(times)),
            t_meta_model=(sum(self.t_meta) / len(times)) if self.t_meta else None, meta_iters=len(self.t_meta),
            last_losses=losses, student_params=n_params)


def measure_method(method: str, cfg: dict, teacher_ckpt: str | None, cycle: int = 4) -> dict:
    """Build ``method``'s model, run ``warmup`` + ``iters`` steps on the run's batch; one result row.

    ``s_per_iter_mean`` is the mean over the timed iterations; ``s_per_iter_best`` the lowest
    mean of ``cycle`` consecutive iterations (``iters`` is a multiple of ``cycle``; a cycle
    holds exactly one meta step of an every-``cycle`` method), the estimate least disturbed by
    other load on the machine. ``phases_best`` are the phases of that cycle, ``phases_mean``
    those of all timed iterations.
    """
    bench = _Bench(method, cfg, teacher_ckpt, cycle)
    bench.warmup()
    for _ in range(bench.cfg['iters'] // cycle):
        bench.run_cycle()
    return bench.finish()


# ---------------------------------------------------------------------------- a run
def _machine(cfg: dict) -> dict:
    info = OrderedDict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                       cpu_count=os.cpu_count(), threads=torch.get_num_threads() if not cfg['threads'] else
                       int(cfg['threads']), device=cfg['device'])
    try:
        with open('/proc/cpuinfo') as f:
            names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
        if names:
            info['cpu'] = names[0]
    except OSError:
        pass
    if cfg['device'] == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(0)
        info['cuda'] = torch.version.cuda
    return info


#: prefix of the worker subprocess's answer lines on stdout
MARK = '@@step_cost '


class _Worker:
    """A ``python -m krbench.step_cost --one METHOD --serve`` subprocess holding one method's model;
    it answers ``warmup``, ``cycle`` and ``finish`` on stdin with one marked JSON line on stdout."""

    def __init__(self, method: str, cfg: dict, teacher_ckpt: str | None, workdir: str, cycle: int):
        self.method = method
        cfg_path = os.path.join(workdir, f'{method}.config.json')
        self.out_path = os.path.join(workdir, f'{method}.result.json')
        self.log_path = os.path.join(workdir, f'{method}.log')
        Path(cfg_path).write_text(json.dumps(dict(cfg=cfg, teacher_ckpt=teacher_ckpt, cycle=cycle)))
        env = dict(os.environ)
        tools = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding krbench/
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(krdistill.__file__)))
        env['PYTHONPATH'] = os.pathsep.join([tools, pkg_root] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
        if cfg['threads']:
            env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(int(cfg['threads']))
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'krbench.step_cost', '--one', method, '--config', cfg_path, '--out',
             self.out_path, '--serve'], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True)

    def reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        code = self.proc.wait()
        self._log.close()
        raise RuntimeError(f'step_cost: the {self.method} subprocess failed (exit {code}):\n'
                           f'{Path(self.log_path).read_text()[-4000:]}')

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()
        return self.reply()

    def finish(self) -> dict:
        self.ask('finish')
        self.proc.stdin.close()
        self.proc.wait()
        self._log.close()
        return json.loads(Path(self.out_path).read_text(), object_pairs_hook=OrderedDict)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log.closed:
            self._log.close()


def _run_workers(methods, cfg: dict, teacher_ckpt: str | None, workdir: str, cycle: int, interleave: bool,
                 log) -> list:
    """One subprocess per method. ``interleave``: all models are built first, then the timed cycles
    go round the methods (cycle c starts at method c), one process running at a time, so that
    every method sees the same background load; else one method after the other."""
    n_cycles = cfg['iters'] // cycle
    workers = []
    try:
        if not interleave:
            rows = []
            for m in methods:
                t0 = time.perf_counter()
                w = _Worker(m, cfg, teacher_ckpt, workdir, cycle)
                workers.append(w)
                w.reply()  # built
                w.ask('warmup')
                for _ in range(n_cycles):
                    w.ask('cycle')
                rows.append(w.finish())
                log(f'{m:22s} measured in {time.perf_counter() - t0:.0f} s')
            return rows
        workers = [_Worker(m, cfg, teacher_ckpt, workdir, cycle) for m in methods]
        for w in workers:
            w.reply()  # built
        log(f'{len(workers)} models built, one process each')
        for w in workers:
            w.ask('warmup')
        for c in range(n_cycles):
            t0 = time.perf_counter()
            order = workers[c % len(workers):] + workers[:c % len(workers)]
            seconds = {w.method: w.ask('cycle')['seconds'] / cycle for w in order}
            log(f'cycle {c + 1}/{n_cycles} ({time.perf_counter() - t0:.0f} s): ' +
                ', '.join(f'{m} {seconds[m]:.3f}' for m in methods) + ' s/iter')
        return [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()


@contextmanager
def _restore_threads(n: int):
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _memory_method(device: str, isolate: bool) -> str:
    if device == 'cuda':
        return 'CUDA max_memory_allocated in the timed steps - memory_allocated before the warm-up'
    return ('peak RSS in the timed steps (VmHWM after clear_refs, else ru_maxrss) - RSS before the warm-up, '
            + ('one subprocess per method' if isolate else 'all methods in one process (not isolated)'))


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(methods=None, isolate: bool | None = None, interleave: bool = True, log=None, **settings) -> dict:
    """Measure ``methods`` (default :data:`DEFAULT_METHODS`) under one configuration.

    Args:
        methods: method names from :data:`METHODS`; ``student`` is added first if missing (the
            ratios need it).
        isolate: one subprocess per method (default: on CPU, where RSS is process-wide; on CUDA
            the methods run in this process, one after the other, with the peak counters reset).
        interleave: with ``isolate``, build all models first and take the timed cycles round
            the methods, so that background load on a shared machine hits all of them alike.
        log: ``callable(str)`` for progress lines (default: silent).
        settings: see :data:`DEFAULTS` (``preset``, ``batch``, ``gt_size``, ``iters``, ...).

    Returns:
        ``{'config', 'machine', 'rows', 'targets'}``; each row holds ``s_per_iter``, ``x_student``,
        ``x_output_kd``, ``peak_mb``, ``mem_x_student``, ``mem_x_output_kd``, ``phases``, ...
    """
    cfg = make_config(**settings)
    log = log or (lambda s: None)
    methods = list(methods or DEFAULT_METHODS)
    for m in methods:
        _method_spec(m)
    if 'student' not in methods:
        methods.insert(0, 'student')
    methods = list(OrderedDict.fromkeys(methods))
    # one cycle = one meta step of every meta.every: the same window for every method of the run
    cycle = 1
    for m in methods:
        cycle = math.lcm(cycle, METHODS[m].get('meta', {}).get('every', 1))
    if cfg['iters'] % cycle:
        iters = -(-cfg['iters'] // cycle) * cycle
        log(f'--iters {cfg["iters"]} -> {iters}: a multiple of {cycle}, so meta.every {cycle} is averaged over '
            'whole cycles')
        cfg['iters'] = iters
    if isolate is None:
        isolate = cfg['device'] == 'cpu'
    threads_before = torch.get_num_threads()
    if cfg['threads']:
        torch.set_num_threads(int(cfg['threads']))
    rows = []
    with tempfile.TemporaryDirectory(prefix='step_cost_') as workdir, _restore_threads(threads_before):
        teacher_ckpt = cfg['teacher_ckpt']
        if teacher_ckpt is None and any(METHODS[m]['model_type'] != 'SRModel' for m in methods):
            teacher_ckpt = write_random_teacher(cfg, os.path.join(workdir, 'teacher_random.pth'))
        if isolate:
            rows = _run_workers(methods, cfg, teacher_ckpt, workdir, cycle, interleave, log)
        else:
            for m in methods:
                t0 = time.perf_counter()
                rows.append(measure_method(m, cfg, teacher_ckpt, cycle=cycle))
                log(f'{m:22s} measured in {time.perf_counter() - t0:.0f} s')
        for row in rows:
            row['s_per_iter'] = row['s_per_iter_best'] if cfg['stat'] == 'best' else row['s_per_iter_mean']
            row['phases'] = row['phases_best'] if cfg['stat'] == 'best' else row['phases_mean']
            log(f'{row["method"]:22s} {row["s_per_iter_best"]:.4f} s/iter best cycle, '
                f'{row["s_per_iter_mean"]:.4f} mean; peak {row["peak_mb"]:.1f} MB')
    by = {r['method']: r for r in rows}
    ref, okd = by['student'], by.get('output_kd')
    for r in rows:
        r['x_student'] = _ratio(r['s_per_iter'], ref['s_per_iter'])
        r['x_output_kd'] = _ratio(r['s_per_iter'], okd['s_per_iter']) if okd else None
        r['mem_x_student'] = _ratio(r['peak_mb'], ref['peak_mb'])
        r['mem_x_output_kd'] = _ratio(r['peak_mb'], okd['peak_mb']) if okd else None
    preset = PRESETS[cfg['preset']]
    config = OrderedDict(cfg, preset_description=preset['description'], scale=preset['scale'], cycle=cycle,
                         time_stat=('lowest mean over a cycle of %d iterations' % cycle if cfg['stat'] == 'best'
                                    else 'mean over all timed iterations'),
                         lq_size=cfg['gt_size'] // preset['scale'], methods=methods, isolated=bool(isolate),
                         teacher_layers=preset['teacher_layers'], student_layers=preset['student_layers'],
                         network_kr=build_options('metakd_exact_every1', cfg, '', '')['network_kr'],
                         teacher_weights='random' if cfg['teacher_ckpt'] is None else 'checkpoint',
                         memory_method=_memory_method(cfg['device'], isolate))
    result = OrderedDict(config=config, machine=_machine(cfg), rows=rows)
    result['targets'] = check_targets(result)
    return result


def check_targets(result: dict) -> list:
    """The issue's targets against the rows present: ``[{row, baseline, limit, quantity, ratio, ok}]``."""
    by = {r['method']: r for r in result['rows']}
    cfg = result.get('config', {})
    out = []
    for names, base, limit, what in TARGETS:
        if base not in by:
            continue
        for n in names:
            if n not in by:
                continue
            ratio = by[n]['x_output_kd'] if what == 'time' else by[n]['mem_x_output_kd']
            ok = None if ratio is None else ratio <= limit
            note = ''
            if what == 'memory' and cfg.get('device') == 'cpu' and not cfg.get('isolated'):
                ok, note = None, 'not isolated: CPU memory needs one subprocess per method'
            out.append(OrderedDict(row=n, baseline=base, quantity=what, limit=limit, ratio=ratio, ok=ok,
                                   note=note))
    return out


# ---------------------------------------------------------------------------- reports
def _f(x, fmt='{:.2f}'):
    return '-' if x is None else fmt.format(x)


def format_table(result: dict) -> str:
    """Markdown table: method, s/iter, x student-alone, x output KD, peak MB, memory ratios."""
    lines = ['| method | s/iter | x student-alone | x output KD | peak MB | x student-alone memory | '
             'x output KD memory | mean s/iter |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in result['rows']:
        lines.append(f'| {r["method"]} | {r["s_per_iter"]:.3f} | {_f(r["x_student"])} | {_f(r["x_output_kd"])} | '
                     f'{r["peak_mb"]:.0f} | {_f(r["mem_x_student"])} | {_f(r["mem_x_output_kd"])} | '
                     f'{r["s_per_iter_mean"]:.3f} |')
    return '\n'.join(lines)


_PHASE_COLUMNS = [('teacher_forward', 'teacher fwd'), ('step.student_forward', 'student fwd'),
                  ('step.kd_terms', 'KD terms fwd'), ('step.rest', 'backward + optim + rest'),
                  ('meta_step', 'meta step'), ('meta.student_forward', 'meta: student fwd'),
                  ('meta.kd_terms', 'meta: KD terms (KRNet) fwd'),
                  ('meta.autograd_create_graph', 'meta: grad w/ create_graph'),
                  ('meta.autograd', 'meta: other grads (double bwd / FD)'), ('meta.other', 'meta: rest')]


def format_phases(result: dict, methods=None) -> str:
    """Markdown table of seconds per iteration by phase (rows: methods)."""
    rows = [r for r in result['rows'] if methods is None or r['method'] in methods]
    head = '| method | s/iter | ' + ' | '.join(c for _, c in _PHASE_COLUMNS) + ' |'
    lines = [head, '|---|' + '---:|' * (len(_PHASE_COLUMNS) + 1)]
    for r in rows:
        p = r['phases']
        lines.append(f'| {r["method"]} | {r["s_per_iter"]:.3f} | ' +
                     ' | '.join(_f(p.get(k), '{:.3f}') for k, _ in _PHASE_COLUMNS) + ' |')
    return '\n'.join(lines)


def format_targets(result: dict) -> str:
    lines = []
    for t in result['targets']:
        verdict = (t.get('note') or '?') if t['ok'] is None else ('meets' if t['ok'] else 'MISSES')
        lines.append(f'- {t["row"]}: {t["quantity"]} {_f(t["ratio"])}x {t["baseline"]} '
                     f'(target <= {t["limit"]}x): {verdict}')
    return '\n'.join(lines)


def format_report(result: dict) -> str:
    c, m = result['config'], result['machine']
    where = m.get('gpu') or m.get('cpu', 'cpu')
    head = (f'preset {c["preset"]} ({c["preset_description"]}); batch {c["batch"]}, gt {c["gt_size"]} '
            f'(lq {c["lq_size"]}); {c["iters"]} timed iterations after {c["warmup"]} warm-up, s/iter = '
            f'{c["time_stat"]}; '
            f'{c["device"]} ({where}), {m["threads"]} threads, torch {m["torch"]}; teacher weights '
            f'{c["teacher_weights"]}')
    return '\n\n'.join([head, format_table(result), 'Seconds per iteration by phase:', format_phases(result),
                        'Targets:', format_targets(result)]) + '\n'


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='step_cost.py',
        description='Time one training iteration and report peak memory of student-alone, output KD, FitNet, '
                    'FAKD and MetaKD on the same arch pair and batch, as ratios to student-alone measured in the '
                    'same run.')
    p.add_argument('--preset', default=DEFAULTS['preset'], choices=list(PRESETS),
                   help='; '.join(f'{k}: {v["description"]}' for k, v in PRESETS.items()))
    p.add_argument('--methods', nargs='+', default=None, metavar='METHOD',
                   help=f'subset of {list(METHODS)} (default: all but at); student is always measured')
    p.add_argument('--batch', type=int, default=DEFAULTS['batch'])
    p.add_argument('--gt-size', type=int, default=DEFAULTS['gt_size'], help='GT patch side (LR = gt / scale)')
    p.add_argument('--iters', type=int, default=DEFAULTS['iters'],
                   help='timed iterations (rounded up to a multiple of 4 when an every-4 method is measured)')
    p.add_argument('--warmup', type=int, default=DEFAULTS['warmup'], help='untimed iterations first')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    p.add_argument('--device', default=DEFAULTS['device'], choices=['cpu', 'cuda'])
    p.add_argument('--stat', default=DEFAULTS['stat'], choices=['best', 'mean'],
                   help='s/iter (and the ratios) from the best cycle of 4 iterations (default: robust to other '
                        'load on the machine) or the mean of all timed iterations; both are in the JSON')
    p.add_argument('--seed', type=int, default=DEFAULTS['seed'])
    p.add_argument('--teacher-ckpt', default=None,
                   help='teacher checkpoint for the preset\'s teacher (default: random weights, written to a '
                        'temporary file)')
    p.add_argument('--teacher-param-key', default=DEFAULTS['teacher_param_key'])
    p.add_argument('--kr', nargs='+', default=None, metavar='KEY=VALUE',
                   help='KRNet option overrides, e.g. --kr width=32 hidden=32 num_kernels=4 (default: the preset\'s '
                        'network_kr: width 64, num_kernels 8, kernel_size 3, corr_radius 1, hidden 64)')
    iso = p.add_mutually_exclusive_group()
    iso.add_argument('--isolate', dest='isolate', action='store_true', default=None,
                     help='one subprocess per method (default on cpu)')
    iso.add_argument('--in-process', dest='isolate', action='store_false',
                     help='all methods in this process (default on cuda; CPU memory numbers then share one '
                          'allocator)')
    p.add_argument('--schedule', default='interleaved', choices=['interleaved', 'sequential'],
                   help='with one subprocess per method: build all models, then time cycle by cycle round the '
                        'methods (default; background load hits all methods alike), or one method after the other')
    p.add_argument('--json', default=None, metavar='OUT', help='write the full result (rows, phases, config) here')
    return p


def parse_kr(items) -> dict | None:
    if not items:
        return None
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise SystemExit(f'--kr: expected KEY=VALUE, got {item!r}')
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    settings = dict(preset=args.preset, batch=args.batch, gt_size=args.gt_size, iters=args.iters,
                    warmup=args.warmup, threads=args.threads, device=args.device, seed=args.seed,
                    teacher_ckpt=args.teacher_ckpt, teacher_param_key=args.teacher_param_key, kr=parse_kr(args.kr),
                    stat=args.stat)
    result = run(args.methods, isolate=args.isolate, interleave=args.schedule == 'interleaved',
                 log=lambda s: print(s, file=sys.stderr, flush=True), **settings)
    result['config']['command'] = 'python tools/step_cost.py ' + ' '.join(
        sys.argv[1:] if argv is None else list(argv))
    print(format_report(result), end='')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + '\n')
    return result


def worker_main(argv=None) -> int:
    """``python -m krbench.step_cost --one METHOD --config CFG.json --out RESULT.json [--serve]``
    (the per-method subprocess of :func:`run`)."""
    p = argparse.ArgumentParser(prog='python -m krbench.step_cost')
    p.add_argument('--one', required=True)
    p.add_argument('--config', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--serve', action='store_true', help='build, then answer warmup / cycle / finish on stdin')
    a = p.parse_args(argv)
    spec = json.loads(Path(a.config).read_text())
    if spec['cfg'].get('threads'):
        torch.set_num_threads(int(spec['cfg']['threads']))
    if not a.serve:
        row = measure_method(a.one, spec['cfg'], spec['teacher_ckpt'], cycle=spec['cycle'])
        Path(a.out).write_text(json.dumps(row))
        return 0

    def answer(**kw):
        sys.stdout.write(MARK + json.dumps(kw) + '\n')
        sys.stdout.flush()

    bench = _Bench(a.one, spec['cfg'], spec['teacher_ckpt'], spec['cycle'])
    answer(built=True)
    for line in sys.stdin:
        command = line.strip()
        if command == 'warmup':
            bench.warmup()
            answer(warm=True)
        elif command == 'cycle':
            answer(seconds=bench.run_cycle())
        elif command == 'finish':
            Path(a.out).write_text(json.dumps(bench.finish()))
            answer(done=True)
            return 0
        else:
            raise ValueError(f'step_cost worker: unknown command {command!r}')
    return 1


if __name__ == '__main__':
    if '--one' in sys.argv[1:]:
        sys.exit(worker_main())
    main()
