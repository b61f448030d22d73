#!/usr/bin/env python
"""GAN-KD on one GPU with the Real-ESRGAN pipeline, in at most 6 minutes: tools/gan_protocol.py on a deadline.

Two steps, the first here, the second on the GPU machine (BENCHMARKS.md, "GAN-KD on GPU")::

    # here: the data (lossless WebP), the teacher and the wheels into .gpu/ (tools/gpu_protocol.py's pack)
    python tools/gpu_gan_protocol.py pack --data-root ../shared/data \\
        --teacher ../shared/models/EDSR_f64b16_x4_T91BSD200_cpu.pth --wheels .whl --dest .gpu
    # there (carry .gpu): install the wheels, then run against a deadline counted from KRD_T0
    python3 tools/gpu_gan_protocol.py run --pack .gpu --out $OUT --device cuda

``run`` (config ``options/bench/gpu_gan_x4.yml``; its iterations are targets):

1. **smoke**: every stage of the protocol (the teacher's RealESRNet and RealESRGAN fine-tuning, the
   student's RealESRNet stage, every GAN row) for ``gpu.smoke.iters`` iterations at the real batch and
   crop, one seed, one test set, scored end to end. An iteration clock (:func:`iteration_clock`) times
   every stage: its seconds per iteration and its fixed cost (process-free: loaders, model, saving);
2. **plan** (:func:`plan_iters`): one fraction of every stage's target iterations (multiples of
   ``gpu.step``, at least ``gpu.floor_iters``) so that the predicted stages and scoring end by
   ``gpu.deadline_s`` less ``gpu.reserve_s``; below ``gpu.min_fraction`` it still runs and says so;
3. the protocol with those iterations (:func:`gan_protocol.run`, stages one after another);
4. under ``--out`` (at most 8 files come back): ``gan_gpu_results.json`` (scores, plan, calibration,
   timings), ``gan_gpu_results.md`` (the CPU protocol's table), ``gan_crops.png`` and
   ``gan_gpu_weights.pth`` (the GAN teacher and every student).
"""
from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tools/ and the checkout (krdistill)

import gpu_protocol as gp  # noqa: E402  (first: KRD_T0, log, pack_source, BasicSR's distutils on Python 3.12)
import gan_protocol as gan  # noqa: E402

CONFIG = HERE.parent / 'options/bench/gpu_gan_x4.yml'
OUT_FILES = ('gan_gpu_results.json', 'gan_gpu_results.md', 'gan_crops.png', 'gan_gpu_weights.pth')


def load_protocol(path) -> dict:
    cfg = gan.load_protocol(path)
    for key in ('deadline_s', 'smoke', 'source'):
        if key not in (cfg.get('gpu') or {}):
            raise KeyError(f'{path}: missing gpu.{key}')
    return cfg


def pack(data_root: Path, teacher: Path | None, wheels: Path | None, dest: Path, config: str) -> dict:
    return gp.pack_source(data_root, load_protocol(config)['gpu']['source'], teacher, wheels, dest)


# ============================================================================================ clock, plan
@contextlib.contextmanager
def iteration_clock(device: str):
    """While open, every model ``krdistill-train`` builds records a time stamp (after a CUDA
    synchronisation) each time its ``feed_data`` is called: yields ``{run name: [stamps]}``. The
    difference of two stamps is one whole iteration: data loading, degradations, both steps, logging."""
    import torch
    import basicsr.train as bsr_train
    stamps: dict[str, list[float]] = {}
    build = bsr_train.build_model

    def timed_build(opt):
        model = build(opt)
        feed, marks = model.feed_data, stamps.setdefault(opt['name'], [])

        def feed_data(data):
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return feed(data)
        model.feed_data = feed_data
        return model
    bsr_train.build_model = timed_build
    try:
        yield stamps
    finally:
        bsr_train.build_model = build


def calibrate(stage_s: dict, stamps: dict, iters: int, skip: int = 2) -> dict:
    """Per stage kind (the stage name less its ``_s<seed>``): ``s_per_iter``, the mean stamp
    difference after the first ``skip`` iterations, and ``fixed_s``, the stage's wall time less
    ``iters`` such iterations."""
    import numpy as np
    out = {}
    for name, wall in stage_s.items():
        d = np.diff(stamps.get(name, []))[skip:]
        s_iter = float(d.mean()) if len(d) else wall / iters
        out[re.sub(r'_s\d+$', '', name)] = dict(s_per_iter=s_iter, fixed_s=max(0.0, wall - iters * s_iter))
    return out


def stage_list(cfg: dict) -> list[tuple[str, str, int]]:
    """(calibration kind, iteration key, how many runs) of every stage of the protocol."""
    n = len(cfg['train']['seeds'])
    return ([('teacher_l1', 'teacher_l1', 1), ('teacher_gan', 'teacher_gan', 1), ('student_l1', 'student_l1', n)]
            + [(m, 'student_gan', n) for m in cfg['methods']])


def target_iters(cfg: dict) -> dict:
    return dict(teacher_l1=cfg['teacher']['l1']['iters'], teacher_gan=cfg['teacher']['gan']['iters'],
                student_l1=cfg['train']['l1']['iters'], student_gan=cfg['train']['gan']['iters'])


def plan_iters(cfg: dict, calib: dict, available_s: float) -> dict:
    """The largest fraction (at most 1) of every stage's target iterations whose predicted time,
    ``sum(fixed_s + iters * s_per_iter * gpu.safety)`` over the stages, fits ``available_s``."""
    g = cfg['gpu']
    step, floor, safety = int(g.get('step', 50)), int(g.get('floor_iters', 50)), float(g.get('safety', 1.15))
    targets, stages = target_iters(cfg), stage_list(cfg)
    fixed = sum(n * calib[k]['fixed_s'] for k, _, n in stages)
    per_fraction = safety * sum(n * targets[key] * calib[k]['s_per_iter'] for k, key, n in stages)
    fraction = min(1.0, max(0.0, (available_s - fixed) / per_fraction))
    iters = {key: max(floor, min(t, int(fraction * t) // step * step)) for key, t in targets.items()}
    predicted = fixed + safety * sum(n * iters[key] * calib[k]['s_per_iter'] for k, key, n in stages)
    return dict(fraction=fraction, iters=iters, predicted_s=predicted, available_s=available_s,
                below_target=fraction < float(g.get('min_fraction', 0.25)))


def with_iters(cfg: dict, iters: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for key, stage in (('teacher_l1', cfg['teacher']['l1']), ('teacher_gan', cfg['teacher']['gan']),
                       ('student_l1', cfg['train']['l1']), ('student_gan', cfg['train']['gan'])):
        stage['iters'] = iters[key]
    return cfg


# ============================================================================================ run
def run(pack_dir: Path, out: Path, device: str, config: str, deadline_s: float | None = None) -> dict:
    cfg = load_protocol(config)
    g = cfg['gpu']
    workers = int(g.get('workers', 8))
    # the scoring processes start before CUDA does (a fork after CUDA's start is unsafe)
    pool = multiprocessing.get_context('fork').Pool(workers) if workers > 1 else None
    try:
        return _run(cfg, pack_dir, out, device, float(deadline_s or g['deadline_s']), pool)
    finally:
        if pool is not None:
            pool.terminate()


def _run(cfg: dict, pack_dir: Path, out: Path, device: str, deadline: float, pool) -> dict:
    import torch
    from krdistill.io import list_images
    g = cfg['gpu']
    out.mkdir(parents=True, exist_ok=True)
    work = Path(g.get('work_dir') or out.parent / (out.name + '_work'))
    data_root = pack_dir / 'data'
    teacher = str(pack_dir / 'teacher.pth') if (pack_dir / 'teacher.pth').is_file() else None
    info = dict(device=device, torch=torch.__version__, python=sys.version.split()[0], teacher=teacher is not None)
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise RuntimeError('--device cuda: torch sees no GPU')
        info['gpu'] = torch.cuda.get_device_name(0)
    gp.log(f'start: {info}')
    timing: dict[str, float] = {}

    # ---------------------------------------------------------------- 1. smoke (and the clock)
    t = time.time()
    with iteration_clock(device) as stamps:
        smoke = gan.run(cfg, data_root, work / 'smoke', teacher, g['smoke'], device=device, pool=pool)
    calib = calibrate(smoke['timing']['stages'], stamps, int(g['smoke']['iters']))
    missing = sorted({k for k, _, _ in stage_list(cfg)} - set(calib))
    if missing:
        raise RuntimeError(f'smoke: no timing for {missing} (a stage reused from an earlier call?)')
    timing['smoke_s'] = time.time() - t
    gp.log(f'smoke passed in {timing["smoke_s"]:.1f} s: ' + ', '.join(
        f'{k} {v["s_per_iter"] * 1e3:.1f} ms/iter + {v["fixed_s"]:.1f} s' for k, v in calib.items()))

    # ---------------------------------------------------------------- 2. plan
    images = sum(len(list_images(data_root / t['hr'])) for t in cfg['data']['test'].values())
    scored = (2 + len(cfg['methods']) * len(cfg['train']['seeds'])) * images
    score_s = smoke['timing']['score_s'] / max(1, smoke['timing']['scored']) * scored * float(g.get('safety', 1.15))
    available = deadline - (time.time() - gp.T0) - float(g.get('reserve_s', 20)) - score_s
    plan = plan_iters(cfg, calib, available)
    plan.update(predicted_score_s=score_s, seeds=cfg['train']['seeds'])
    gp.log(f'plan: {plan["iters"]} ({plan["fraction"]:.2f} of the targets), seeds {plan["seeds"]}; predicted '
           f'{plan["predicted_s"]:.0f} s of {available:.0f} s + scoring {score_s:.0f} s'
           + (' -- BELOW gpu.min_fraction' if plan['below_target'] else ''))

    # ---------------------------------------------------------------- 3. the protocol
    t = time.time()
    try:
        res = gan.run(with_iters(cfg, plan['iters']), data_root, work / 'run', teacher, False, device=device,
                      pool=pool)
    except BaseException as e:  # what was learnt comes back even so (the traceback is in the command's log)
        (out / 'gan_gpu_results.json').write_text(json.dumps(dict(
            info=info, plan=plan, calibration=calib, timing=dict(timing, failed_after_s=time.time() - gp.T0),
            error=repr(e), smoke_stage_s=smoke['timing']['stages'], config=cfg), indent=1))
        raise
    timing['run_s'] = time.time() - t

    # ---------------------------------------------------------------- 4. outputs
    runs = work / 'run' / 'experiments'
    nets = {p.parent.parent.name: p for p in sorted(runs.glob('*/models/net_g_latest.pth'))}
    weights = {name: torch.load(p, map_location='cpu', weights_only=True)['params'] for name, p in nets.items()
               if name == 'teacher_gan' or name.rsplit('_s', 1)[0] in cfg['methods']}
    torch.save(dict(weights=weights, teacher=cfg['teacher']['network'], student=cfg['student']['network']),
               out / 'gan_gpu_weights.pth')
    shutil.copyfile(work / 'run' / 'gan_crops.png', out / 'gan_crops.png')
    timing['total_s'] = time.time() - gp.T0
    head = (f'GAN-KD on {info.get("gpu", device)}, Real-ESRGAN pipeline: iterations {plan["iters"]} '
            f'({plan["fraction"]:.2f} of the targets{", BELOW gpu.min_fraction" if plan["below_target"] else ""}), '
            f'teacher {res["teacher_gain_db"]:+.2f} dB over bicubic on the first set, {timing["total_s"]:.0f} s '
            f'from the command\'s start (deadline {deadline:.0f} s)\n\n')
    (out / 'gan_gpu_results.md').write_text(head + (work / 'run' / 'results.md').read_text())
    result = dict(info=info, plan=plan, calibration=calib, timing=timing, stage_s=res['timing']['stages'],
                  results={k: v for k, v in res.items() if k != 'timing'}, smoke_stage_s=smoke['timing']['stages'],
                  config=cfg)
    (out / 'gan_gpu_results.json').write_text(json.dumps(result, indent=1))
    gp.log(f'done in {timing["total_s"]:.1f} s (deadline {deadline:.0f} s): {", ".join(OUT_FILES)} in {out}')
    return result


def main(argv=None) -> int:
    gp.cli(argv, __doc__.split('\n')[0], str(CONFIG), pack, run)
    return 0


if __name__ == '__main__':
    sys.exit(main())
