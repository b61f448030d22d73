#!/usr/bin/env python
r"""List the modules of ``network_g`` / ``network_t`` with their output shapes.

Builds the arch of an option YAML with basicsr's ``build_network`` (krdistill's archs
registered), runs one dummy forward on a small LR input with forward hooks on every module,
and prints one row per module: dotted name, class, output shape and whether it is a valid
distillation point for ``FeatureRecorder`` (a ``B x C x H x W`` map, or ``B x L x C`` tokens
from a module called with an ``(H, W)`` size argument, such as SwinIR's ``layers.<i>``).

Examples::

    python tools/list_modules.py -opt options/metakd_edsr_x4.yml --depth 2
    python tools/list_modules.py -opt options/metakd_swinir_x4.yml --net network_t \
        --filter '^layers\.\d+$'
"""
from __future__ import annotations

import argparse
import re
import sys
from copy import deepcopy

import torch
from torch import nn

import krdistill  # noqa: F401  (shims before basicsr, registers krdistill archs)
from krdistill.features import unwrap

IN_CHANNEL_KEYS = ('num_in_ch', 'in_chans', 'in_nc', 'in_channels')
NETWORK_KEYS = ('network_g', 'network_t')


def _size_arg(args: tuple):
    """The first ``(H, W)`` pair of ints among positional args (SwinIR's ``x_size``), or None."""
    return next((a for a in args if isinstance(a, (tuple, list)) and len(a) == 2
                 and all(isinstance(v, int) for v in a)), None)


def describe_output(output, args: tuple = ()) -> tuple[str, str]:
    """``(shape text, kind)`` of a module output; kind is ``'map'``, ``'tokens'`` (reshapeable),
    or ``''`` (not a distillation point). Tuple outputs are judged by their first element, as
    :class:`krdistill.features.FeatureRecorder` does."""
    prefix = ''
    if isinstance(output, (tuple, list)):
        if not output:
            return 'empty tuple', ''
        prefix = f'{type(output).__name__}[0]: '
        output = output[0]
    if not torch.is_tensor(output):
        return 'not a tensor', ''
    shape = ' x '.join(str(s) for s in output.shape)
    if output.dim() == 4:
        return prefix + shape, 'map'
    if output.dim() == 3:
        size = _size_arg(args)
        text = f'{prefix}tokens {shape}'
        if size is not None and size[0] * size[1] == output.shape[1]:
            return f'{text} (-> {output.shape[0]} x {output.shape[2]} x {size[0]} x {size[1]})', 'tokens'
        return text, ''
    return prefix + shape, ''


def module_rows(net: nn.Module, input_size: tuple[int, int] = (32, 32), in_ch: int = 3,
                pattern: str | None = None, depth: int | None = None, batch: int = 1) -> list[dict]:
    """One dummy forward with hooks on every sub-module; a row per (selected) module.

    Args:
        net: the network (wrappers are removed); it is put in eval mode.
        input_size: ``(H, W)`` of the dummy LR input.
        in_ch: input channels.
        pattern: keep names matching this regular expression (``re.search``).
        depth: keep names with at most this many dotted components.
        batch: dummy batch size.

    Returns:
        dicts with ``name``, ``cls``, ``shape`` (text), ``kind`` (``'map'``, ``'tokens'`` or
        ``''``), ``valid`` (bool: usable by ``FeatureRecorder``), ``channels`` (int or None) and
        ``calls`` (how many times the module ran; a recorder keeps the last call).
    """
    net = unwrap(net)
    regex = re.compile(pattern) if pattern else None
    records: dict[str, dict] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            shape, kind = describe_output(output, args)
            out0 = output[0] if isinstance(output, (tuple, list)) and output else output
            channels = None
            if kind == 'map':
                channels = int(out0.shape[1])
            elif kind == 'tokens':
                channels = int(out0.shape[2])
            calls = records.get(name, {}).get('calls', 0) + 1
            records[name] = dict(shape=shape, kind=kind, channels=channels, calls=calls)
        return hook

    names = []
    for name, module in net.named_modules():
        if name == '':
            continue
        if regex is not None and not regex.search(name):
            continue
        if depth is not None and len(name.split('.')) > depth:
            continue
        names.append((name, module))
        handles.append(module.register_forward_hook(make_hook(name)))
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters(), None)
        x = torch.rand(batch, in_ch, *input_size, device=param.device if param is not None else 'cpu')
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    rows = []
    for name, module in names:
        rec = records.get(name, dict(shape='not run', kind='', channels=None, calls=0))
        rows.append(dict(name=name, cls=module.__class__.__name__, valid=bool(rec['kind']), **rec))
    return rows


def network_in_channels(network_opt: dict, default: int = 3) -> int:
    """Input channels named in a ``network_*`` option section (``num_in_ch``, ``in_chans``, ...)."""
    for key in IN_CHANNEL_KEYS:
        if key in network_opt:
            return int(network_opt[key])
    return default


def build_from_opt(opt: dict, net_key: str) -> nn.Module:
    """``build_network(opt[net_key])`` without mutating ``opt``."""
    from basicsr.archs import build_network
    if net_key not in opt:
        raise KeyError(f'option file has no {net_key} section')
    return build_network(deepcopy(opt[net_key]))


def format_rows(rows: list[dict]) -> str:
    """Fixed-width table; the ``KD`` column marks valid distillation points."""
    header = ('name', 'class', 'output', 'KD', 'calls')
    body = [(r['name'], r['cls'], r['shape'],
             {'map': 'yes', 'tokens': 'yes (tokens)'}.get(r['kind'], ''), str(r['calls'])) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             '  '.join('-' * w for w in widths)]
    lines += ['  '.join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-opt', '--opt', required=True, help='option YAML')
    p.add_argument('--net', choices=NETWORK_KEYS, nargs='+', default=None,
                   help='network section(s) to list (default: those present of network_g, network_t)')
    p.add_argument('--size', type=int, nargs='+', default=[32], metavar='N',
                   help='dummy LR input size: N (square) or H W (default 32)')
    p.add_argument('--in-ch', type=int, default=None, help='input channels (default: from the network options, else 3)')
    p.add_argument('--filter', default=None, metavar='REGEX', help='only module names matching REGEX')
    p.add_argument('--depth', type=int, default=None, metavar='N', help='only names with at most N dotted parts')
    p.add_argument('--valid-only', action='store_true', help='only valid distillation points')
    p.add_argument('--pairs', type=int, nargs='?', const=0, default=None, metavar='N',
                   help="the teacher/student pairs kd: auto chooses (N points; default: the option file's "
                        'kd.points, else 1) for network_t and network_g')
    return p.parse_args(argv)


def print_pairs(opt: dict, args, size) -> int:
    """Print what ``kd: auto`` chooses for the option file's two networks."""
    import torch

    from krdistill.pairing import auto_pairs, format_pairs
    missing = [k for k in ('network_t', 'network_g') if k not in opt]
    if missing:
        print(f'error: --pairs needs network_t and network_g; {args.opt} has no {missing}', file=sys.stderr)
        return 1
    kd = opt.get('kd') if isinstance(opt.get('kd'), dict) else {}
    points = args.pairs or int(kd.get('points', 1))
    in_ch = args.in_ch or network_in_channels(opt['network_g'])
    lq = torch.rand(1, in_ch, size[0], size[1], generator=torch.Generator().manual_seed(0))
    try:
        pairs = auto_pairs(build_from_opt(opt, 'network_t'), build_from_opt(opt, 'network_g'), points, lq)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'kd: auto, {points} point(s), input 1 x {in_ch} x {size[0]} x {size[1]} (teacher -> student):')
    print(format_pairs(pairs))
    return 0


def main(argv=None) -> int:
    from krdistill.io import OptionFileError, load_options
    args = parse_args(argv)
    if len(args.size) not in (1, 2):
        print('error: --size takes N or H W', file=sys.stderr)
        return 2
    size = (args.size[0], args.size[-1])
    try:
        opt = load_options(args.opt, '-opt')  # krdistill's safe YAML loader: a Python tag is refused
    except (OptionFileError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    if args.pairs is not None:
        return print_pairs(opt, args, size)
    nets = args.net or [k for k in NETWORK_KEYS if k in opt]
    missing = [k for k in nets if k not in opt]
    if not nets or missing:
        print(f'error: {args.opt} has no {missing or list(NETWORK_KEYS)} section', file=sys.stderr)
        return 1
    for key in nets:
        net = build_from_opt(opt, key)
        in_ch = args.in_ch or network_in_channels(opt[key])
        rows = module_rows(net, size, in_ch, args.filter, args.depth)
        if args.valid_only:
            rows = [r for r in rows if r['valid']]
        n_params = sum(p.numel() for p in net.parameters())
        print(f'{key}: {opt[key].get("type")} ({n_params:,} parameters), input 1 x {in_ch} x {size[0]} x {size[1]}')
        print(format_rows(rows))
        print()
    return 0


if __name__ == '__main__':
    sys.exit(main())
