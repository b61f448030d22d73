#!/usr/bin/env python
r"""Export the student network of a krdistill run as a clean BasicSR ``net_g`` file.

Input: a checkpoint ``experiments/<name>/models/net_g_<iter>.pth`` (or ``net_g_latest.pth``),
or a run folder ``experiments/<name>`` / its ``models`` folder (the latest ``net_g`` is taken,
or ``--iter``). Output: a file holding only ``params`` (and ``params_ema`` when present),
``module.`` prefixes removed, tensors on CPU. It loads in vanilla BasicSR ``SRModel`` with
``path.pretrain_network_g`` (``param_key_g: params`` or ``params_ema``).

KRNet / regressor files (``net_kr_*``, ``net_kd_*``) and training states are refused. Files are read
with ``torch.load(..., weights_only=True)`` (:func:`krdistill.io.load_checkpoint`): never code. A
student holding a NaN or infinite value is refused. Exit code 0 on success, 1 on any refusal or
failed write (``error: ...`` on stderr), 2 on a usage error.
``--opt`` builds ``network_g`` of an option YAML and loads the export strictly to verify it.

Examples::

    python tools/export_student.py experiments/EDSR_x4_metakd -o EDSR_x4_student.pth
    python tools/export_student.py experiments/EDSR_x4_metakd/models/net_g_200000.pth \
        -o student.pth --param-key params_ema --opt options/metakd_edsr_x4.yml
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import re
import sys
from collections import OrderedDict
from copy import deepcopy

import torch

import krdistill  # noqa: F401  (shims before basicsr)
from krdistill.io import (NonFiniteError, OptionFileError, check_finite, load_checkpoint, load_options,
                          save_checkpoint, strip_prefix, write_error_cause)

STUDENT_KEYS = ('params', 'params_ema')
_NET_G_ITER = re.compile(r'^net_g_(\d+)\.pth$')
_OTHER_NET = re.compile(r'^net_(?!g_)([A-Za-z0-9]+)_(\d+|latest)\.pth$')


class ExportError(ValueError):
    """The input is not a student (``net_g``) checkpoint or cannot be exported as asked."""


def find_checkpoint(path: str, iteration: int | str | None = None) -> str:
    """Resolve a run folder, a ``models`` folder or a file to one ``net_g`` checkpoint path.

    In a folder, ``net_g_<iteration>.pth`` is taken when ``iteration`` is given, else
    ``net_g_latest.pth`` if present, else the highest ``net_g_<iter>.pth``.
    """
    if osp.isfile(path):
        return path
    if not osp.isdir(path):
        raise FileNotFoundError(f'{path}: no such file or folder')
    folder = osp.join(path, 'models') if osp.isdir(osp.join(path, 'models')) else path
    files = os.listdir(folder)
    if iteration is not None:
        name = f'net_g_{iteration}.pth'
        if name not in files:
            raise FileNotFoundError(f'{folder} has no {name}; net_g files there: '
                                    f'{sorted(f for f in files if f.startswith("net_g_"))}')
        return osp.join(folder, name)
    if 'net_g_latest.pth' in files:
        return osp.join(folder, 'net_g_latest.pth')
    iters = sorted((int(m.group(1)), f) for f in files if (m := _NET_G_ITER.match(f)))
    if not iters:
        raise FileNotFoundError(f'{folder} holds no net_g_<iter>.pth or net_g_latest.pth (student checkpoints)')
    return osp.join(folder, iters[-1][1])


def student_state(state: dict) -> OrderedDict:
    """``state`` without ``module.`` prefixes (:func:`krdistill.io.strip_prefix`), as contiguous CPU
    tensors; anything that is not a tensor is refused."""
    out = OrderedDict()
    for k, v in strip_prefix(state).items():
        if not torch.is_tensor(v):
            raise ExportError(f'entry {k!r} is a {type(v).__name__}, not a tensor: not a network state dict')
        out[k] = v.detach().to('cpu').contiguous().clone()
    return out


def extract_student(ckpt, param_key: str = 'all', source: str = 'checkpoint') -> dict[str, OrderedDict]:
    """Student state dicts of a loaded checkpoint.

    Args:
        ckpt: what ``torch.load`` returned for a BasicSR ``net_g`` file
            (``{'params': state, 'params_ema': state}``).
        param_key: ``'all'`` keeps ``params`` and ``params_ema`` (those present);
            ``'params'`` or ``'params_ema'`` keeps that one, stored under ``params`` so that
            BasicSR's default ``param_key_g`` loads it.
        source: name for error messages.

    Returns:
        ``{'params': ..., ['params_ema': ...]}`` with ``module.`` prefixes removed, CPU tensors.
    """
    if not isinstance(ckpt, dict):
        raise ExportError(f'{source}: holds a {type(ckpt).__name__}, not a BasicSR network dict')
    present = [k for k in STUDENT_KEYS if k in ckpt and isinstance(ckpt[k], dict)]
    if not present:
        hint = ''
        if 'optimizers' in ckpt or 'schedulers' in ckpt:
            hint = ' It looks like a training state (.state); export a models/net_g_<iter>.pth file instead.'
        elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            hint = ' It is a bare state dict; BasicSR student files wrap it as {"params": ...}.'
        raise ExportError(f'{source}: holds no student params (keys {sorted(map(str, ckpt))[:8]}; expected '
                          f'"params" or "params_ema").{hint}')
    if param_key == 'all':
        return {k: student_state(ckpt[k]) for k in present}
    if param_key not in STUDENT_KEYS:
        raise ExportError(f'--param-key must be one of all, {", ".join(STUDENT_KEYS)}; got {param_key!r}')
    if param_key not in present:
        raise ExportError(f'{source}: has no {param_key!r} (it has {present})')
    return {'params': student_state(ckpt[param_key])}


def export_student(src: str, dst: str, param_key: str = 'all', iteration: int | str | None = None,
                   allow_any_name: bool = False) -> dict[str, OrderedDict]:
    """Write the student of ``src`` (checkpoint or run folder) to ``dst``; return what was written."""
    path = find_checkpoint(src, iteration)
    name = osp.basename(path)
    m = _OTHER_NET.match(name)
    if m and not allow_any_name:
        raise ExportError(f'{path}: a net_{m.group(1)} file holds the weights of network "{m.group(1)}" '
                          '(e.g. KRNet or a regressor), not the student; export net_g_<iter>.pth. '
                          'Use --allow-any-name if it really holds a student.')
    if name.endswith('.state'):
        raise ExportError(f'{path}: a training state, not a network; export models/net_g_<iter>.pth')
    try:  # weights_only=True: a file passed here never runs code
        ckpt = load_checkpoint(path, 'input')
    except RuntimeError as err:
        raise ExportError(str(err)) from err
    out = extract_student(ckpt, param_key, source=path)
    try:  # a student with a NaN or infinite weight is not exported
        check_finite(out, path, 'input', action='export')
    except NonFiniteError as err:
        raise ExportError(str(err)) from None
    if osp.abspath(dst) == osp.abspath(path):
        raise ExportError('output path equals the input checkpoint; choose another --output')
    if osp.isdir(dst):
        raise ExportError(f'--output: {dst} is a folder; give a file name, e.g. {osp.join(dst, "student.pth")}')
    try:
        os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    except OSError as err:
        raise ExportError(f'--output: cannot create the folder of {dst}: {write_error_cause(err, osp.dirname(dst))}') \
            from None
    try:
        save_checkpoint(out, dst, '--output')
    except RuntimeError as err:
        raise ExportError(str(err)) from None
    return out


def verify(states: dict[str, OrderedDict], network_opt: dict) -> int:
    """Build ``network_opt`` with basicsr's ``build_network``, load every state strictly.

    Returns the number of parameters of the built network.
    """
    from basicsr.archs import build_network
    net = build_network(deepcopy(network_opt))
    for key, state in states.items():
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ExportError(f'{key} does not load strictly into network_g ({network_opt.get("type")}): '
                              f'{err}') from err
    return sum(p.numel() for p in net.parameters())


def load_network_opt(opt_path: str, key: str = 'network_g') -> dict:
    """``network_g`` of an option file, read with krdistill's safe YAML loader (a Python tag is refused)."""
    try:
        opt = load_options(opt_path, '--opt')
    except (OptionFileError, OSError) as err:
        raise ExportError(str(err)) from None
    if not isinstance(opt.get(key), dict):
        raise ExportError(f'--opt: {opt_path} has no {key} section')
    return opt[key]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('input', help='net_g_<iter>.pth / net_g_latest.pth, or a run folder experiments/<name>')
    p.add_argument('-o', '--output', default=None,
                   help='output file (default: <checkpoint stem>_student.pth next to the checkpoint)')
    p.add_argument('--param-key', choices=('all', ) + STUDENT_KEYS, default='all',
                   help="'all' (default): keep params and params_ema when present; 'params' or "
                   "'params_ema': keep that one only, saved under 'params'")
    p.add_argument('--iter', default=None, help='iteration to take from a run folder (default: latest)')
    p.add_argument('-opt', '--opt', default=None, help='option YAML: verify strict load into its network_g')
    p.add_argument('--allow-any-name', action='store_true', help='do not refuse net_<x>_ files other than net_g_')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        src = find_checkpoint(args.input, args.iter)
        dst = args.output or osp.splitext(src)[0] + '_student.pth'
        states = export_student(src, dst, args.param_key, allow_any_name=args.allow_any_name)
        print(f'Exported {", ".join(f"{k} ({len(v)} tensors)" for k, v in states.items())} of {src} -> {dst}')
        if args.opt:
            n = verify(states, load_network_opt(args.opt))
            print(f'Verified: loads strictly into network_g of {args.opt}; {n:,} parameters')
    except (ExportError, OSError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
