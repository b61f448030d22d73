"""Gaps against training length: the benchmark's rows at several run lengths, side by side.

Every (length, method, seed) run is an ordinary benchmark job (:func:`~krbench.benchmark.run_job`,
the shipped ``train_step`` on the cached teacher outputs), with its own cosine schedule that ends
at its length: one schedule rule for every length. Jobs of every length share one pool of
``workers`` processes, longest first, so the short runs fill the gaps; a second call with the
same ``--out`` reuses every finished run (and the benchmark's runs of the same name).

Config: a benchmark config (``options/bench/cpu_x4.yml`` schema) plus::

    lengths:            # iterations: seeds
      3000: [0, 1]
      27000: [0]
    frozen_equals: fitnet_out_fastreg   # optional: a method the frozen control equals by construction
    method_lengths:     # optional: rows run at fewer lengths / seeds (each a subset of `lengths`)
      dukd_2step: {3000: [0, 1]}

A method block with ``equal_compute: <row>`` runs, at each length ``n``, the iterations whose
teacher + student FLOPs equal ``<row>``'s at ``n`` (:func:`~krbench.benchmark.iteration_budget`);
it is reported in the column of ``n``, with its own iterations beside it.

Writes ``lengths.json``, ``lengths.md`` (per length: every row, its gap to the same-seed student
alone, MetaKD - frozen, the teacher's lead over the student alone) and ``lengths.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np

from krdistill import evaluation as ev

from .benchmark import (METHOD_LABELS, execute, iteration_budget, job_spec, load_config, log, mean_std, plus_minus,
                        prepare, reference_scores)
from .methods import is_metakd

__all__ = ['run_lengths', 'parse_lengths', 'narrow_lengths', 'summarize_lengths', 'format_lengths', 'plot_lengths', 'main']

#: relative cost per iteration, for the longest-first order only (MetaKD: KRNets and meta steps)
_COST = {'student_alone': 1.0, 'output_kd': 1.15}


def _cost(method: str, mcfg: dict) -> float:
    if is_metakd(mcfg):
        return 1.6
    if 'upcycle_opt' in (mcfg or {}):
        return 1.2 + max(1, int((mcfg['upcycle_opt'] or {}).get('zoom_in', 1)))  # a zoom-in tile costs ~1 patch
    return _COST.get(method, 1.3)


def _method_lengths(cfg: dict, lengths: dict[int, list[int]]) -> dict[str, dict[int, list[int]]]:
    """Per method: ``{iterations: seeds}``, ``lengths`` unless ``method_lengths`` narrows it."""
    raw = cfg.get('method_lengths') or {}
    out = {}
    for m in cfg['methods']:
        if m not in raw:
            out[m] = lengths
            continue
        own = {}
        for k, seeds in (raw[m] or {}).items():
            n = int(k)
            if n not in lengths or not set(seeds) <= set(lengths[n]):
                raise ValueError(f'method_lengths.{m}.{k}: must be a length of `lengths` with a subset of its seeds '
                                 f'({lengths})')
            own[n] = list(seeds)
        out[m] = own
    unknown = sorted(set(raw) - set(cfg['methods']))
    if unknown:
        raise KeyError(f'method_lengths: {unknown} are not methods of this config')
    return out


def _lengths(cfg: dict) -> dict[int, list[int]]:
    raw = cfg.get('lengths')
    if not isinstance(raw, dict) or not raw:
        raise KeyError('lengths: a mapping {iterations: [seeds]} is needed, e.g. {3000: [0, 1], 9000: [0]}')
    out = {}
    for k, seeds in raw.items():
        n = int(k)
        if n < 1 or not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f'lengths.{k}: iterations >= 1 with a non-empty list of integer seeds, got {seeds!r}')
        out[n] = list(seeds)
    return dict(sorted(out.items()))


def parse_lengths(items: list[str]) -> dict[int, list[int]]:
    """``['3000:0,1', '27000:0']`` -> ``{3000: [0, 1], 27000: [0]}`` (the ``--lengths`` syntax)."""
    out = {}
    for item in items:
        n, sep, seeds = item.partition(':')
        try:
            out[int(n)] = [int(s) for s in seeds.split(',')] if sep else None
        except ValueError:
            raise ValueError(f'--lengths {item!r}: expected ITERATIONS or ITERATIONS:SEED,SEED,...') from None
    return out


def narrow_lengths(cfg: dict, lengths: dict[int, list[int]], only: dict[int, list[int] | None]
                   ) -> dict[int, list[int]]:
    """The study's lengths cut down to ``only`` (``None`` seeds: all of that length's); ``cfg``'s
    ``method_lengths`` is narrowed in place, and rows left with no run are dropped."""
    new = {}
    for n, seeds in only.items():
        if n not in lengths or (seeds is not None and not set(seeds) <= set(lengths[n])):
            raise ValueError(f'--lengths {n}:{seeds}: not a length of the config with a subset of its seeds ({lengths})')
        new[n] = lengths[n] if seeds is None else list(seeds)
    narrowed = {}
    for m, own in (cfg.get('method_lengths') or {}).items():
        keep = {int(k): [s for s in v if s in new.get(int(k), [])] for k, v in (own or {}).items()}
        narrowed[m] = {k: v for k, v in keep.items() if v}
    for m in [m for m, own in narrowed.items() if not own]:
        del cfg['methods'][m], narrowed[m]
    cfg['method_lengths'] = narrowed
    cfg['lengths'] = new
    return dict(sorted(new.items()))


def run_lengths(config: str | dict, data_root, out, teacher_ckpt: str | None = None, workers: int | None = None,
                threads: int | None = None, methods: list[str] | None = None, device: str = 'cpu',
                plot: bool = True, only: dict[int, list[int]] | None = None) -> dict:
    """Every (length, method, seed) job, then the summary; returns it (also ``out/lengths.json``).

    ``only`` (``--lengths``) narrows the study to those lengths and seeds, each a subset of the
    config's; every row's ``method_lengths`` is narrowed with it.
    """
    t0 = time.time()
    cfg = copy.deepcopy(config) if isinstance(config, dict) else load_config(config)
    lengths = _lengths(cfg)
    if only:
        lengths = narrow_lengths(cfg, lengths, only)
    if methods:
        unknown = [m for m in methods if m not in cfg['methods']]
        if unknown:
            raise KeyError(f'--methods: {unknown} not in the config\'s methods {sorted(cfg["methods"])}')
        cfg['methods'] = {m: cfg['methods'][m] for m in methods}
        cfg['method_lengths'] = {m: v for m, v in (cfg.get('method_lengths') or {}).items() if m in methods}
    bud = cfg.get('budget') or {}
    workers = bud.get('workers', 2) if workers is None else workers
    threads = bud.get('threads', 1) if threads is None else threads
    data_root, out = Path(data_root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'config.json', 'w') as f:
        json.dump(cfg, f, indent=1)
    ctx = prepare(cfg, data_root, out, teacher_ckpt, max(1, workers) * threads, device)

    jobs = []
    per_method = _method_lengths(cfg, lengths)
    budgets = {}
    for m, mc in cfg['methods'].items():
        for n, seeds in per_method[m].items():
            if (m, n) not in budgets:
                budgets[m, n] = iteration_budget(cfg, m, mc, n)
                if budgets[m, n] != n:
                    log(f'{m}: {budgets[m, n]} iterations at the compute of {mc["equal_compute"]} x {n}')
            for s in seeds:
                jobs.append((budgets[m, n] * _cost(m, mc),
                             job_spec(cfg, ctx, f'{m}_s{s}_i{n}', m, mc, s, budgets[m, n], threads, nominal_iters=n)))
    jobs.sort(key=lambda j: -j[0])
    specs = [j[1] for j in jobs]
    total = sum(j[0] for j in jobs)
    state = dict(left=total, n=0, t=time.time())
    log(f'lengths: {len(specs)} jobs ({", ".join(f"{n} it x {len(s)} seeds" for n, s in lengths.items())}, '
        f'{len(cfg["methods"])} methods) on {workers} x {threads}-thread workers')

    def on_done(i, r):
        state['left'] -= jobs[i][0]
        state['n'] += 1
        el = time.time() - state['t']
        done = total - state['left']
        eta = el / done * state['left'] if done > 0 else float('nan')
        log(f'[{state["n"]}/{len(specs)}] {specs[i]["name"]} done; elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min')

    results = execute(specs, workers, on_done)
    runs = {s['name']: r for s, r in zip(specs, results)}
    ref = reference_scores(cfg, ctx, out, max(1, workers) * threads, device)
    summary = summarize_lengths(cfg, lengths, runs, ref)
    with open(out / 'lengths.json', 'w') as f:
        json.dump(dict(summary=summary, runs=runs, reference=ref), f, indent=1)
    md = format_lengths(summary)
    (out / 'lengths.md').write_text(md)
    if plot:
        plot_lengths(summary, out / 'lengths.png')
        plot_gap_curves(runs, max(lengths), out / f'gap_curves_{max(lengths)}.png')
    log(f'lengths done in {(time.time() - t0) / 60:.1f} min; {out / "lengths.md"}')
    print(md, flush=True)
    return summary


def _paired(a: dict, b: dict, test: str) -> dict | None:
    """``a - b`` per common seed (Y-PSNR), mean / std / values; None without a common seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = mean_std([a[s]['tests'][test]['psnr'] - b[s]['tests'][test]['psnr'] for s in seeds])
    d['seeds'] = seeds
    return d


def summarize_lengths(cfg: dict, lengths: dict, runs: dict, ref: dict) -> dict:
    """Per length: each method's scores, its paired gap to the student alone, MetaKD - frozen and
    the teacher's lead over the student alone."""
    tests = list(cfg['data']['test'])
    frozen_as = cfg.get('frozen_equals')
    out = dict(tests=tests, lengths=[], teacher={t: ref['teacher'][t]['psnr'] for t in tests},
               bicubic={t: ref['bicubic'][t]['psnr'] for t in tests}, frozen_equals=frozen_as)
    for n in lengths:
        by = {m: {r['seed']: r for r in runs.values() if r['method'] == m and r.get('nominal_iters', r['iters']) == n}
              for m in cfg['methods']}
        alone = by.get('student_alone', {})
        rows = []
        for m, rs in by.items():
            if not rs:
                continue
            row = dict(method=m, seeds=sorted(rs), s_per_iter=mean_std([r['s_per_iter'] for r in rs.values()]),
                       iters=max(r['iters'] for r in rs.values()))
            for t in tests:
                row[t] = mean_std([rs[s]['tests'][t]['psnr'] for s in sorted(rs)])
                if m != 'student_alone':
                    row[f'{t}_gap'] = _paired(rs, alone, t)
            rows.append(row)
        entry = dict(iters=n, rows=rows, lead={}, meta_minus_frozen={})
        for t in tests:
            if alone:
                entry['lead'][t] = out['teacher'][t] - float(np.mean([r['tests'][t]['psnr'] for r in alone.values()]))
        frozen = by.get('metakd_frozen') or (by.get(frozen_as) if frozen_as else None) or {}
        for m, rs in by.items():
            if m.startswith('metakd') and m != 'metakd_frozen' and rs and frozen:
                entry['meta_minus_frozen'][m] = {t: _paired(rs, frozen, t) for t in tests}
        out['lengths'].append(entry)
    return out


def _signed(d: dict) -> str:
    """A paired difference: signed mean, then ± the std over seeds (ddof 1) when there are several."""
    return f'{d["mean"]:+.3f}' + (f' ± {d["std"]:.3f}' if d['n'] > 1 else '')


def format_lengths(s: dict) -> str:
    tests = s['tests']
    teacher = ', '.join(f'{t} {s["teacher"][t]:.3f}' for t in tests)
    bicubic = ', '.join(f'{t} {s["bicubic"][t]:.3f}' for t in tests)
    lines = [f'Teacher: {teacher} dB; bicubic: {bicubic} dB. Gap = method - student alone of the same seed '
             '(Y-PSNR, dB; mean ± std over seeds, per-seed values in brackets).', '']
    for e in s['lengths']:
        lead = ', '.join(f'{t} {e["lead"][t]:+.3f}' for t in tests if t in e['lead'])
        lines += [f'**{e["iters"]} iterations** (teacher - student alone: {lead or "–"} dB)', '']
        header = ['method', 'seeds'] + [f'{t} PSNR' for t in tests] + [f'{t} gap' for t in tests] + ['s/iter']
        body = []
        for r in e['rows']:
            gaps = []
            for t in tests:
                g = r.get(f'{t}_gap')
                gaps.append('–' if g is None else _signed(g) +
                            (' [' + ' '.join(f'{v:+.3f}' for v in g['values']) + ']' if g['n'] > 1 else ''))
            label = METHOD_LABELS.get(r['method'], r['method'])
            if r.get('iters', e['iters']) != e['iters']:
                label += f' ({r["iters"]} it)'
            body.append([label, len(r['seeds'])] +
                        [plus_minus(r[t]) for t in tests] + gaps + [f'{r["s_per_iter"]["mean"]:.3f}'])
        lines += [ev.markdown_table(header, body), '']
        for m, d in e['meta_minus_frozen'].items():
            ref = 'frozen' if s.get('frozen_equals') is None else f'frozen (= {s["frozen_equals"]} by construction)'
            vals = ', '.join(t + ' ' + _signed(d[t]) + ' [' + ' '.join(f'{v:+.3f}' for v in d[t]['values']) + ']'
                             for t in tests if d[t] is not None)
            lines += [f'{METHOD_LABELS.get(m, m)} - {ref}: {vals}', '']
    return '\n'.join(lines)


def plot_lengths(s: dict, path: Path) -> None:
    """Gap to the student alone against training length (one panel per test set), with each
    seed's value, and the teacher's lead over the student alone (dashed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tests = s['tests']
    fig, axes = plt.subplots(1, len(tests), figsize=(5.2 * len(tests), 3.8), dpi=90, squeeze=False)
    methods = [r['method'] for e in s['lengths'] for r in e['rows'] if r['method'] != 'student_alone']
    methods = list(dict.fromkeys(methods))
    for ax, t in zip(axes[0], tests):
        for m in methods:
            xs, ys, pts = [], [], []
            for e in s['lengths']:
                r = next((r for r in e['rows'] if r['method'] == m), None)
                g = r.get(f'{t}_gap') if r else None
                if g is None:
                    continue
                xs.append(e['iters'])
                ys.append(g['mean'])
                pts += [(e['iters'], v) for v in g['values']]
            if xs:
                line, = ax.plot(xs, ys, marker='o', lw=1.3, label=METHOD_LABELS.get(m, m))
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=9, color=line.get_color(), alpha=0.5)
        lx = [e['iters'] for e in s['lengths'] if t in e['lead']]
        if lx:
            ax.plot(lx, [e['lead'][t] for e in s['lengths'] if t in e['lead']], 'k--', lw=1,
                    label='teacher - student alone')
        ax.axhline(0, color='grey', lw=0.8)
        ax.set_xscale('log')
        ax.set_xticks([e['iters'] for e in s['lengths']])
        ax.set_xticklabels([str(e['iters']) for e in s['lengths']])
        ax.set_xlabel('training length (iterations, cosine to 0 at the end)')
        ax.set_ylabel(f'{t}: gain over student alone (dB)')
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gap_curves(runs: dict, iters: int, path: Path, val: str = 'Set5') -> None:
    """Along the runs of length ``iters``: each method's validation PSNR minus the same-seed
    student alone's at the same iteration (mean over seeds, each seed faint): where a gain comes
    from a faster start, it peaks early and shrinks."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    by: dict[str, dict[int, dict]] = {}
    for r in runs.values():
        if r['iters'] == iters and r.get('curve'):
            by.setdefault(r['method'], {})[r['seed']] = {p['it']: p['psnr'] for p in r['curve']}
    alone = by.pop('student_alone', {})
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for m, seeds in by.items():
        diffs = []
        for sd, c in seeds.items():
            if sd in alone:
                its = sorted(set(c) & set(alone[sd]))
                diffs.append((its, [c[i] - alone[sd][i] for i in its]))
        if not diffs:
            continue
        its = sorted(set.intersection(*[set(d[0]) for d in diffs]))
        mean = [np.mean([dict(zip(*d))[i] for d in diffs]) for i in its]
        line, = ax.plot(its, mean, lw=1.3, label=METHOD_LABELS.get(m, m))
        for d in diffs:
            ax.plot(d[0], d[1], lw=0.6, alpha=0.35, color=line.get_color())
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xlabel(f'iteration (runs of {iters}, cosine to 0 at the end)')
    ax.set_ylabel(f'{val} validation PSNR - student alone (dB)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-opt', '--config', required=True, help='lengths config YAML (options/bench/*_lengths.yml)')
    p.add_argument('--data-root', required=True, help='folder holding the data sets named in the config')
    p.add_argument('--out', required=True, help='run folder (a second call reuses every finished run)')
    p.add_argument('--teacher', default=None, help='teacher checkpoint; default: the config\'s, else trained here')
    p.add_argument('--workers', type=int, default=None, help='parallel worker processes (0: in-process)')
    p.add_argument('--threads', type=int, default=None, help='torch threads per worker')
    p.add_argument('--methods', nargs='+', default=None, help='subset of the config methods')
    p.add_argument('--device', default='cpu', help="torch device of every job, e.g. 'cuda'")
    p.add_argument('--lengths', nargs='+', default=None, metavar='ITERS[:SEEDS]',
                   help="subset of the config's lengths and seeds, e.g. 3000:0,1 27000:0")
    return p


def main(argv=None) -> dict:
    a = build_parser().parse_args(argv)
    only = parse_lengths(a.lengths) if a.lengths else None
    return run_lengths(a.config, a.data_root, a.out, a.teacher, a.workers, a.threads, a.methods, a.device,
                       only=only)
