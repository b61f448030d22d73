#!/usr/bin/env python
"""Draw the scalars of a TensorBoard event file in a grid, like TensorBoard's scalar dashboard.

    python tools/plot_tb.py tb_logger/demo_metakd_x2 -o docs/demo/tb_view.png
    python tools/plot_tb.py tb_logger/my_run --tags 'l_|meta_grad_norm|kr0_' --smoothing 0.6

``RUN`` is an event file or a folder holding one (BasicSR writes ``tb_logger/<name>`` when
``logger.use_tb_logger: true``; the newest event file is read). One panel per tag: the raw values
faint, TensorBoard's debiased exponential smoothing drawn over them. Tags are ordered as
krdistill logs them: the losses (``losses/l_*``), the meta-gradient norm and meta-step time, then
each KRNet's ``kr<i>_*`` (texture gain, texture entropy, FitNet weight), then anything else.
Needs ``tensorboard`` (a BasicSR dependency) and ``matplotlib`` (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

__all__ = ['find_event_file', 'read_scalars', 'order_tags', 'smooth', 'plot', 'main']

#: krdistill's log keys, in the order of the panels (the rest follow, sorted)
ORDER = ('losses/l_pix', 'losses/l_kd_out', 'losses/l_texture', 'losses/l_kd_fitnet', 'losses/l_kd_at',
         'losses/l_kd_fakd', 'losses/l_meta', 'meta_grad_norm', 't_meta')
TB_ORANGE = '#f57c00'  # TensorBoard's first run colour


def find_event_file(run: str | Path) -> Path:
    """``run`` itself when it is a file, else the newest ``events.out.tfevents.*`` under it."""
    run = Path(run)
    if run.is_file():
        return run
    files = sorted(run.rglob('events.out.tfevents.*'), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f'no TensorBoard event file (events.out.tfevents.*) under {run}; BasicSR writes '
                                'tb_logger/<name> when the option file sets logger.use_tb_logger: true')
    return files[-1]


def read_scalars(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` of every scalar in one event file (all points, none sampled away)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(path), size_guidance={'scalars': 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()['scalars']:
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def _kr_key(tag: str):
    m = re.fullmatch(r'kr(\d+)_(.*)', tag)
    return (int(m.group(1)), m.group(2)) if m else None


def order_tags(tags) -> list[str]:
    """krdistill's keys first (:data:`ORDER`), then the KRNets' ``kr<i>_*`` by point, then the rest."""
    tags = list(tags)
    known = [t for t in ORDER if t in tags]
    kr = sorted((t for t in tags if _kr_key(t)), key=_kr_key)
    rest = sorted(t for t in tags if t not in known and t not in kr)
    return known + kr + rest


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average (``weight`` in [0, 1))."""
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight ** n) if weight > 0 else last)
    return out


def plot(scalars: dict, out: str | Path, title: str = '', cols: int = 3, smoothing: float = 0.6,
         tags: str | None = None) -> list[str]:
    """Draw one panel per tag (those matching the regex ``tags``, if given) into ``out``; returns the tags."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f'plot_tb needs matplotlib ({e}); pip install matplotlib') from e
    names = order_tags(t for t in scalars if tags is None or re.search(tags, t))
    if not names:
        raise ValueError(f'no scalar tag matches {tags!r}; the event file has {sorted(scalars)}')
    cols = max(1, min(cols, len(names)))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows + (0.5 if title else 0)), squeeze=False)
    for ax, tag in zip(axes.flat, names):
        steps, values = scalars[tag]
        ax.plot(steps, values, color=TB_ORANGE, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(values, smoothing), color=TB_ORANGE, linewidth=1.6)
        ax.set_title(tag, fontsize=10, loc='left')
        ax.grid(True, color='#e0e0e0', linewidth=0.6)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 4))
        for side in ('top', 'right'):
            ax.spines[side].set_visible(False)
        ax.set_xlabel('iteration', fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha='left')
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return names


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run', help='event file, or a folder holding one (tb_logger/<name>)')
    p.add_argument('-o', '--out', default='tb_view.png', help='PNG to write (default: tb_view.png)')
    p.add_argument('--tags', default=None, help='only tags matching this regular expression')
    p.add_argument('--cols', type=int, default=3, help='panels per row (default 3)')
    p.add_argument('--smoothing', type=float, default=0.6, help="TensorBoard's smoothing weight (default 0.6)")
    p.add_argument('--title', default=None, help='title (default: the run folder name)')
    a = p.parse_args(argv)
    if not 0 <= a.smoothing < 1:
        p.error('--smoothing: must be in [0, 1)')
    path = find_event_file(a.run)
    title = a.title if a.title is not None else f'TensorBoard scalars: {path.parent.name}'
    names = plot(read_scalars(path), a.out, title, a.cols, a.smoothing, a.tags)
    print(f'{len(names)} scalars from {path} -> {a.out}')
    return names


if __name__ == '__main__':
    main()
