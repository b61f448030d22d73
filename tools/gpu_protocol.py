#!/usr/bin/env python
"""The GPU protocol: the length study's rows near convergence on one GPU, in at most 6 minutes.

Two steps, the first here, the second on the GPU machine::

    # here: pack what the GPU machine lacks into .gpu/ (ignored; lossless WebP images, the teacher, wheels)
    python tools/gpu_protocol.py pack --data-root ../shared/data \\
        --teacher ../shared/models/EDSR_f64b16_x4_T91BSD200_cpu.pth --wheels .whl --dest .gpu
    # there (carry .gpu): install the wheels, then run against a deadline counted from the command start
    export KRD_T0=$(date +%s.%N); python3 -m pip install -q --no-index --no-deps --target .gpu/site \\
        .gpu/wheels/*.whl && export PYTHONPATH=$PWD/.gpu/site; \\
        python3 tools/gpu_protocol.py run --pack .gpu --out $OUT --device cuda

``run`` has four stages and writes everything under ``--out`` (at most 8 files come back):

1. **smoke** (under a minute, fails fast): the packed data decode, every method trains 20
   iterations end to end on the device (tiny pool), and a calibration: every (method, seed) job of
   the real protocol runs ``calibrate_iters`` iterations *at once* on the device, as the real run
   will, which gives each job's seconds per iteration under that contention;
2. the patch pool, the quiz pool and the teacher's cached outputs and features;
3. the plan: the longest student run (a multiple of 1000, at most the config's length) whose
   predicted time fits the deadline; below ``min_iters`` it still runs and says so;
4. the runs (:func:`krbench.lengths.run_lengths`, every job its own process on the one GPU, the
   pool preloaded into GPU memory), then ``gpu_results.json``, ``gpu_lengths.md``,
   ``gpu_lengths.png``, ``gpu_curves.png`` and ``students.pth`` (every student's weights).

Config: ``options/bench/gpu_h200_lengths.yml`` (``base:`` the CPU length study, whose rows it runs,
and the GPU's changes).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # tools/ (the krbench package) and the checkout (krdistill)

T0 = float(os.environ.get('KRD_T0') or time.time())  # the command's start (the deadline counts from it)
OUT_FILES = ('gpu_results.json', 'gpu_lengths.md', 'gpu_lengths.png', 'gpu_curves.png', 'students.pth')


def log(msg: str) -> None:
    print(f'[{time.time() - T0:6.1f} s] {msg}', flush=True)


def _distutils_fallback() -> None:
    """BasicSR 1.4.2 imports ``distutils.version.LooseVersion`` (gone from Python 3.12's standard
    library; setuptools normally provides it). Only where neither is there: a stand-in with the
    one class it uses, for this process (the GPU machine's Python, not the library)."""
    try:
        import distutils.version  # noqa: F401  pylint: disable=unused-import
    except ImportError:
        import types
        from packaging.version import Version

        class LooseVersion:
            def __init__(self, v):
                self.v = Version(str(v).split('+')[0])

            def __lt__(self, o):
                return self.v < LooseVersion(o).v

            def __ge__(self, o):
                return self.v >= LooseVersion(o).v

        mod, ver = types.ModuleType('distutils'), types.ModuleType('distutils.version')
        ver.LooseVersion = LooseVersion
        mod.version = ver
        sys.modules.update({'distutils': mod, 'distutils.version': ver})


_distutils_fallback()  # at import: spawned job processes import this file first (as __mp_main__)


def deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_protocol(path: str | os.PathLike) -> dict:
    """The GPU config: ``base`` (a length-study config, relative to the checkout) updated by the
    rest; ``gpu:`` holds this script's own keys."""
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if cfg.get('base'):
        with open(ROOT / cfg['base']) as f:
            base = yaml.safe_load(f)
        lengths = cfg.get('lengths')  # replaced, not merged: the GPU runs its own lengths
        cfg = deep_update(base, {k: v for k, v in cfg.items() if k not in ('base', 'lengths')})
        if lengths is not None:
            cfg['lengths'] = lengths
    cfg.pop('method_lengths', None)  # the CPU study's per-row lengths: the GPU runs every row at its one length
    for key in ('gpu', 'lengths', 'methods'):
        if key not in cfg:
            raise KeyError(f'{path}: missing key {key!r}')
    skip = (cfg.get('gpu') or {}).get('skip_methods') or []
    unknown = sorted(set(skip) - set(cfg['methods']))
    if unknown:
        raise KeyError(f'{path}: gpu.skip_methods: {unknown} are not methods of the config')
    cfg['methods'] = {m: v for m, v in cfg['methods'].items() if m not in skip}
    from krbench.methods import check_method
    for m, block in cfg['methods'].items():
        check_method(block, f'{path}: methods.{m}')
    return cfg


# ============================================================================================ pack
def pack(data_root: Path, teacher: Path | None, wheels: Path | None, dest: Path, config: str) -> dict:
    """Write what the run needs into ``dest``: the config's training and test images as lossless
    WebP (the same pixels, about 2/3 of the PNG size; excluded images left out), the teacher
    checkpoint and the wheels. Returns the manifest (also ``dest/MANIFEST.json``)."""
    return pack_source(data_root, load_protocol(config).get('gpu', {}).get('source', {}), teacher, wheels, dest)


def pack_source(data_root: Path, src: dict, teacher: Path | None, wheels: Path | None, dest: Path) -> dict:
    """:func:`pack` of the folders ``src['folders']`` (relative to ``data_root``) less ``src['exclude']``."""
    import cv2
    import numpy as np
    from krdistill.io import list_images
    exclude = {str(Path(e)) for e in src.get('exclude', [])}
    folders = list(src.get('folders', []))
    dest.mkdir(parents=True, exist_ok=True)
    n, size = 0, 0
    for folder in folders:
        out = dest / 'data' / folder
        out.mkdir(parents=True, exist_ok=True)
        for p in list_images(data_root / folder):
            if str(p.relative_to(data_root)) in exclude:
                continue
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if img.ndim == 2:  # grey: stored as the 3 equal channels krdistill's read_image makes of it
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            ok, buf = cv2.imencode('.webp', img, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100: lossless
            if not ok or not np.array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), img):
                raise RuntimeError(f'{p}: lossless WebP round trip failed')
            (out / (p.stem + '.webp')).write_bytes(buf.tobytes())
            n += 1
            size += len(buf)
    man = dict(images=n, image_bytes=size, folders=folders, excluded=sorted(exclude))
    if teacher is not None:
        shutil.copyfile(teacher, dest / 'teacher.pth')
        man['teacher'] = teacher.name
    if wheels is not None:
        (dest / 'wheels').mkdir(exist_ok=True)
        man['wheels'] = []
        for w in sorted(wheels.glob('*.whl')):
            shutil.copyfile(w, dest / 'wheels' / w.name)
            man['wheels'].append(w.name)
    man['total_bytes'] = sum(p.stat().st_size for p in dest.rglob('*') if p.is_file())
    (dest / 'MANIFEST.json').write_text(json.dumps(man, indent=1))
    log(f'packed {n} images ({size / 2**20:.1f} MiB) into {dest}; {man["total_bytes"] / 2**20:.1f} MiB in all')
    return man


# ============================================================================================ run
def start_mps(g: dict) -> dict:
    """Try NVIDIA's Multi-Process Service (``gpu.mps``, default on), before any CUDA use: without
    it the job processes' kernels take turns on the GPU, and tiny students are bound by kernel
    count; with it they run side by side. A user-space daemon (no GPU setting is changed), quit by
    :func:`stop_mps`; kept only if a fresh process can use CUDA through it, else the run goes on
    without."""
    import subprocess
    import tempfile
    if not g.get('mps', True):
        return dict(mps='off (gpu.mps: false)')
    exe = shutil.which('nvidia-cuda-mps-control') or next(
        (p for p in ('/usr/local/nvidia/bin/nvidia-cuda-mps-control', '/usr/bin/nvidia-cuda-mps-control')
         if os.path.exists(p)), None)
    if exe is None:
        return dict(mps='not found')
    d = tempfile.mkdtemp(prefix='krd_mps_')
    env = dict(CUDA_MPS_PIPE_DIRECTORY=f'{d}/pipe', CUDA_MPS_LOG_DIRECTORY=f'{d}/log')
    for v in env.values():
        os.makedirs(v, exist_ok=True)
    os.environ.update(env)
    try:
        r = subprocess.run([exe, '-d'], capture_output=True, text=True, timeout=15)
        if r.returncode == 0:
            probe = subprocess.run([sys.executable, '-c', 'import torch; print(float(torch.ones(2).cuda().sum()))'],
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0 and probe.stdout.strip() == '2.0':
                return dict(mps='on', exe=exe)
            stop_mps(dict(exe=exe))
            why = f'a CUDA process could not start through it: {(probe.stderr or probe.stdout).strip()[-300:]}'
        else:
            why = f'{exe} -d: {(r.stderr or r.stdout).strip()[-300:]}'
    except (OSError, subprocess.SubprocessError) as e:
        why = repr(e)
    for k in env:
        os.environ.pop(k, None)
    return dict(mps=f'off ({why})')


def stop_mps(info: dict) -> None:
    import subprocess
    if info.get('exe'):
        try:
            subprocess.run([info['exe']], input='quit\n', text=True, capture_output=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            pass


def _tiny(cfg: dict) -> dict:
    """The smoke configuration: the real rows and networks on a tiny pool, 20 iterations, seed 0."""
    t = copy.deepcopy(cfg)
    t['pool'] = dict(t['pool'], size=64, quiz_size=32)
    t['train'] = dict(t['train'], val_every=10, log_every=10, preload=False)
    t['lengths'] = {20: [0]}
    t['data'] = dict(t['data'], test={k: v for k, v in list(t['data']['test'].items())[:1]})
    return t


def _calibrate(cfg: dict, ctx: dict, iters: int, device: str) -> dict:
    """Every (method, seed) job runs ``iters`` iterations, all at once (one process each), on the
    device: each method's seconds per iteration under the real run's contention. MetaKD is
    calibrated with meta-learning on from the start (its costlier half)."""
    from krbench.benchmark import execute, job_spec
    seeds = sorted({s for ss in cfg['lengths'].values() for s in ss})
    specs = []
    for m, mc in cfg['methods'].items():
        mc = copy.deepcopy(mc)
        mc.pop('start_fraction', None)
        for s in seeds:
            sp = job_spec(cfg, ctx, f'calib_{m}_s{s}', m, mc, s, iters, cfg['gpu'].get('threads', 1))
            sp.update(val_every=10**9, log_every=10**9, tests={})
            specs.append(sp)
    res = execute(specs, len(specs))
    out: dict[str, float] = {}
    for sp, r in zip(specs, res):
        out[sp['method']] = max(out.get(sp['method'], 0.0), r['s_per_iter'])
    return out


def plan_iters(cfg: dict, s_per_iter: dict, available_s: float) -> int:
    """The longest run (a multiple of ``gpu.step``, at most the config's length) whose slowest
    job fits ``available_s`` (all jobs run at once); at least ``gpu.floor_iters``."""
    g = cfg['gpu']
    cap = max(int(k) for k in cfg['lengths'])
    step = int(g.get('step', 1000))
    slow = max(s_per_iter.values()) * float(g.get('safety', 1.1))
    fit = int((available_s - float(g.get('job_overhead_s', 15))) / slow) // step * step
    return max(int(g.get('floor_iters', step)), min(cap, fit))


def run(pack_dir: Path, out: Path, device: str, config: str, deadline_s: float | None = None) -> dict:
    import torch
    cfg = load_protocol(config)
    g = cfg['gpu']
    deadline = float(deadline_s if deadline_s is not None else g.get('deadline_s', 345))
    info = dict(device=device, torch=torch.__version__, python=sys.version.split()[0])
    mps = start_mps(g) if device.startswith('cuda') else dict(mps='off (not a GPU run)')
    info.update(mps=mps['mps'])
    try:
        return _run(cfg, g, pack_dir, out, device, deadline, info)
    finally:
        stop_mps(mps)


def _run(cfg: dict, g: dict, pack_dir: Path, out: Path, device: str, deadline: float, info: dict) -> dict:
    import torch
    from krbench import lengths as bl
    from krbench.benchmark import plot_curves, prepare
    out.mkdir(parents=True, exist_ok=True)
    work = Path(g.get('work_dir') or out.parent / (out.name + '_work'))
    work.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    data_root = pack_dir / 'data'
    teacher = pack_dir / cfg['teacher']['checkpoint'] if cfg['teacher'].get('checkpoint') else None
    cfg['teacher']['checkpoint'] = str(teacher) if teacher else None
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise RuntimeError('--device cuda: torch sees no GPU')
        info['gpu'] = torch.cuda.get_device_name(0)
    log(f'start: {info}')

    # ---------------------------------------------------------------- 1. smoke
    t = time.time()
    from krdistill.io import list_images, read_image
    for folder in g['source']['folders']:
        imgs = list_images(data_root / folder)
        if not imgs or read_image(imgs[0]) is None:
            raise RuntimeError(f'{data_root / folder}: no readable images (was `pack` run and .gpu carried?)')
    smoke = bl.run_lengths(_tiny(cfg), data_root, work / 'smoke', str(teacher) if teacher else None, workers=0,
                           device=device, plot=False)
    bad = [r['method'] for e in smoke['lengths'] for r in e['rows']
           if not all(r[tn]['mean'] == r[tn]['mean'] for tn in smoke['tests'])]
    if bad:
        raise RuntimeError(f'smoke: non-finite scores for {bad}')
    calib_cfg = copy.deepcopy(cfg)
    calib_cfg['pool'] = dict(cfg['pool'], size=int(g.get('calibrate_pool', 2048)))
    calib_ctx = prepare(calib_cfg, data_root, work / 'calib', str(teacher) if teacher else None,
                        g.get('threads', 1), device)
    s_per_iter = _calibrate(calib_cfg, calib_ctx, int(g.get('calibrate_iters', 200)), device)
    timing['smoke_s'] = time.time() - t
    log(f'smoke passed in {timing["smoke_s"]:.1f} s; s/iter under contention: '
        + ', '.join(f'{m} {v * 1e3:.2f} ms' for m, v in s_per_iter.items()))

    # ---------------------------------------------------------------- 2. pools, teacher cache
    t = time.time()
    ctx = prepare(cfg, data_root, work / 'run', str(teacher) if teacher else None, g.get('threads', 1) * 4, device)
    timing['prepare_s'] = time.time() - t

    # ---------------------------------------------------------------- 3. plan
    available = deadline - (time.time() - T0) - float(g.get('reserve_s', 25))
    iters = plan_iters(cfg, s_per_iter, available)
    seeds = sorted({s for ss in cfg['lengths'].values() for s in ss})
    plan = dict(iters=iters, seeds=seeds, available_s=available, s_per_iter=s_per_iter,
                below_target=iters < int(g.get('min_iters', 50000)))
    log(f'plan: {iters} iterations x seeds {seeds} x {len(cfg["methods"])} methods, all at once; '
        f'{available:.0f} s available' + (' -- BELOW the min_iters target' if plan['below_target'] else ''))

    # ---------------------------------------------------------------- 4. runs, outputs
    t = time.time()
    run_cfg = copy.deepcopy(cfg)
    run_cfg['lengths'] = {iters: seeds}
    n_jobs = len(seeds) * len(cfg['methods'])
    summary = bl.run_lengths(run_cfg, data_root, work / 'run', str(teacher) if teacher else None, workers=n_jobs,
                             threads=g.get('threads', 1), device=device, plot=False)
    timing['runs_s'] = time.time() - t
    runs = json.loads((work / 'run' / 'lengths.json').read_text())['runs']
    runs = {k: v for k, v in runs.items() if v['iters'] == iters}
    students = {}
    for name, r in runs.items():
        ck = torch.load(Path(ctx['out']) / 'runs' / name / 'student.pth', map_location='cpu', weights_only=True)
        students[name] = ck['params']
    torch.save(dict(students=students, network=cfg['student']['network']), out / 'students.pth')
    (out / 'gpu_lengths.md').write_text(bl.format_lengths(summary))
    bl.plot_lengths(summary, out / 'gpu_lengths.png')
    plot_curves(summary, runs, out / 'gpu_curves.png')
    timing['total_s'] = time.time() - T0
    res = dict(info=info, plan=plan, timing=timing, summary=summary, calibration=s_per_iter, config=cfg,
               runs={k: {kk: v[kk] for kk in ('method', 'seed', 'iters', 's_per_iter', 'tests', 'curve', 'meta_log',
                                              'skipped_steps', 'peak_cuda_mib') if kk in v}
                     for k, v in runs.items()})
    (out / 'gpu_results.json').write_text(json.dumps(res, indent=1))
    log(f'done in {timing["total_s"]:.1f} s (deadline {deadline:.0f} s): {", ".join(OUT_FILES)} in {out}')
    print(bl.format_lengths(summary), flush=True)
    return res


def cli(argv, description: str, config: str, pack_fn, run_fn):
    """The ``pack`` / ``run`` command line of a GPU protocol script (this one, tools/gpu_gan_protocol.py):
    ``pack_fn(data_root, teacher, wheels, dest, config)``, ``run_fn(pack, out, device, config, deadline_s)``."""
    p = argparse.ArgumentParser(description=description)
    sub = p.add_subparsers(dest='cmd', required=True)
    a = sub.add_parser('pack', help='write the data, teacher and wheels the GPU machine lacks into --dest')
    a.add_argument('--data-root', required=True)
    a.add_argument('--teacher', default=None, help='the teacher checkpoint to carry (teacher.pth there)')
    a.add_argument('--wheels', default=None, help='folder of wheels to carry (.whl)')
    a.add_argument('--dest', default='.gpu')
    a.add_argument('--config', default=config)
    b = sub.add_parser('run', help='smoke, plan, runs against the deadline; outputs in --out')
    b.add_argument('--pack', default='.gpu', help='the folder `pack` wrote')
    b.add_argument('--out', required=True)
    b.add_argument('--device', default='cuda')
    b.add_argument('--config', default=config)
    b.add_argument('--deadline-s', type=float, default=None, help='seconds from KRD_T0 (default: the config\'s)')
    args = p.parse_args(argv)
    if args.cmd == 'pack':
        return pack_fn(Path(args.data_root), Path(args.teacher) if args.teacher else None,
                       Path(args.wheels) if args.wheels else None, Path(args.dest), args.config)
    return run_fn(Path(args.pack), Path(args.out), args.device, args.config, args.deadline_s)


def main(argv=None):
    return cli(argv, __doc__.split('\n')[0], str(ROOT / 'options/bench/gpu_h200_lengths.yml'), pack, run)


if __name__ == '__main__':
    main()
