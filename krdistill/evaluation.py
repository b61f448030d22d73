"""Evaluate SR networks on image folders with BasicSR's metrics (Y-channel PSNR/SSIM, BT.601).

Protocol: LR input given (reference files) or made with MATLAB-compatible bicubic, SR output
rounded to uint8, border = scale removed, no self-ensemble. Used by the demo, the benchmark
and ``tools/evaluate.py``.
"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

import krdistill  # noqa: F401  (shims and registration before basicsr)
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils.matlab_functions import imresize

from .data_utils import matlab_imresize_uint8
from .io import (CheckpointError, OptionFileError, check_finite, list_images, load_checkpoint, load_options, read_image,
                 state_dict_from, strip_prefix)

__all__ = ['read_image', 'list_images', 'mod_crop', 'bicubic_downscale', 'bicubic_upscale', 'super_resolve',
           'y_psnr_ssim', 'load_pairs', 'evaluate', 'markdown_table', 'PRESETS', 'build_network', 'load_network',
           'find_checkpoints', 'evaluate_checkpoints', 'run', 'main']


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (top-left kept)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB bicubic downscale of a uint8 image (bit-exact ``imresize(hr, 1/scale)``)."""
    return matlab_imresize_uint8(hr, 1 / scale)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscaling (the 'bicubic' baseline row), uint8 in and out."""
    out = imresize(lr.astype(np.float64) / 255., scale)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


@torch.no_grad()
def super_resolve(net: nn.Module, lr: np.ndarray, device: str | torch.device = 'cpu',
                  name: str | None = None) -> np.ndarray:
    """Run ``net`` on a uint8 BGR image; returns the uint8 BGR SR image.

    With ``name`` (the image, for the message), an output holding NaN or infinite values raises
    ``FloatingPointError`` instead of being rounded into an image and scored.
    """
    x = torch.from_numpy(np.ascontiguousarray(lr[:, :, ::-1].transpose(2, 0, 1))).float().div(255.)
    was_training = net.training
    net.eval()
    out = net(x[None].to(device))[0]
    net.train(was_training)
    if name is not None and not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f'{name}: the network\'s output holds {int((~torch.isfinite(out)).sum())} non-finite '
                                 'value(s); not scored')
    out = out.clamp(0, 1).cpu().numpy()
    return (out.transpose(1, 2, 0)[:, :, ::-1] * 255.).round().astype(np.uint8)


def y_psnr_ssim(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[float, float]:
    """Y-channel PSNR and SSIM with ``border`` pixels removed (BasicSR's metrics)."""
    if sr.shape != hr.shape:
        raise ValueError(f'SR {sr.shape} and HR {hr.shape} differ in shape')
    psnr = calculate_psnr(sr, hr, crop_border=border, input_order='HWC', test_y_channel=True)
    ssim = calculate_ssim(sr, hr, crop_border=border, input_order='HWC', test_y_channel=True)
    return float(psnr), float(ssim)


def load_pairs(hr_dir: str | os.PathLike, scale: int, lr_dir: str | os.PathLike | None = None) -> list[dict]:
    """HR images (mod-cropped) with their LR: read from ``lr_dir`` (same file names) when given,
    otherwise made with MATLAB-compatible bicubic."""
    pairs = []
    for hr_path in list_images(hr_dir):
        hr = mod_crop(read_image(hr_path), scale)
        if lr_dir is not None:
            lr = read_image(Path(lr_dir) / hr_path.name)
            if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                raise ValueError(f'{Path(lr_dir) / hr_path.name}: LR {lr.shape[:2]} x{scale} does not match '
                                 f'HR {hr.shape[:2]} (after cropping to a multiple of {scale})')
        else:
            lr = bicubic_downscale(hr, scale)
        pairs.append(dict(name=hr_path.stem, hr=hr, lr=lr))
    if not pairs:
        raise FileNotFoundError(f'no images in {hr_dir}')
    return pairs


def evaluate(net: nn.Module | None, pairs: Sequence[dict], scale: int, device='cpu') -> dict:
    """Per-image and mean Y-PSNR/SSIM of ``net`` (``None``: bicubic upscaling). An output with a
    non-finite value is refused (``FloatingPointError`` naming the image), never scored."""
    rows = []
    for p in pairs:
        sr = bicubic_upscale(p['lr'], scale) if net is None else super_resolve(net, p['lr'], device, name=p['name'])
        psnr, ssim = y_psnr_ssim(sr, p['hr'], border=scale)
        rows.append(dict(name=p['name'], psnr=psnr, ssim=ssim))
    return dict(images=rows, psnr=float(np.mean([r['psnr'] for r in rows])),
                ssim=float(np.mean([r['ssim'] for r in rows])))


def markdown_table(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    header = list(header)
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------ networks
#: ``--preset`` names for :func:`main` (BasicSR ``network_g`` dicts)
PRESETS = {
    f'edsr-f{f}b{b}-x{s}': dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=f, num_block=b, upscale=s,
                                res_scale=0.1 if f >= 256 else 1, img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])
    for f, b in ((16, 4), (32, 4), (64, 8), (64, 16), (256, 32)) for s in (2, 3, 4)
}


def build_network(net_opt: dict) -> nn.Module:
    """A network from a BasicSR ``network_g``-style dict (``type`` + arguments): BasicSR's
    ``build_network`` (its registry and name resolution; krdistill's archs are registered).
    ``net_opt`` is not changed."""
    from basicsr.archs import build_network as basicsr_build_network
    return basicsr_build_network(copy.deepcopy(dict(net_opt)))


def load_network(net: nn.Module, path: str | os.PathLike, param_key: str | None = None,
                 key: str = 'checkpoint') -> nn.Module:
    """Load a checkpoint into ``net`` (strict; ``weights_only=True``, :mod:`krdistill.io`).
    ``param_key``: ``params`` / ``params_ema``; default: ``params_ema``, else ``params`` (as
    BasicSR's test), else ``state_dict`` (mmengine), else a bare state dict. ``module.`` prefixes
    are removed; a state holding a non-finite tensor is refused (:class:`krdistill.io.NonFiniteError`);
    ``key`` names the file's source in messages. Returns ``net`` in eval mode."""
    ckpt = load_checkpoint(path, key)
    if param_key is None and isinstance(ckpt, dict):  # 'auto', with the key it picks named in messages
        param_key = next((k for k in ('params_ema', 'params', 'state_dict') if isinstance(ckpt.get(k), dict)), None)
    state = strip_prefix(state_dict_from(ckpt, param_key, str(path), '--param-key'))
    check_finite(state, path, key, prefix=param_key or '')
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f'{key}: {path} does not load strictly into the network ({type(net).__name__}): '
                           f'{str(e)[:500]}') from None
    return net.eval()


def _network_from_option(path: str | os.PathLike, key: str = 'network_g') -> dict:
    opt = load_options(path, '-opt')
    if not isinstance(opt.get(key), dict):
        raise KeyError(f'-opt: {path} has no {key!r} section (--network-key)')
    return opt[key]


def find_checkpoints(path: str | os.PathLike) -> list[tuple[str, Path, dict | None]]:
    """``(name, checkpoint, network dict or None)`` for a checkpoint file or a benchmark run folder
    (``<out>/runs/<job>/student.pth`` with the network in ``result.json``)."""
    import json
    path = Path(path)
    if path.is_file():
        return [(path.stem, path, None)]
    if not path.exists():
        raise FileNotFoundError(f'checkpoint: no such file or folder: {path}')
    runs = path / 'runs' if (path / 'runs').is_dir() else path
    found = []
    for ck in sorted(runs.glob('*/student.pth')):
        net = None
        if (ck.parent / 'result.json').exists():
            with open(ck.parent / 'result.json') as f:
                net = json.load(f).get('network')
        found.append((ck.parent.name, ck, net))
    if not found:
        raise FileNotFoundError(f'{path}: neither a checkpoint file nor a folder with */student.pth')
    return found


def check_upscale(net: nn.Module, scale: int, path, device='cpu') -> None:
    """The network upscales by ``scale`` (one forward of a 16 x 16 input); else an error naming --scale."""
    c = next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), 3)
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, c, 16, 16, device=device))
    except Exception:  # an arch that needs other input sizes: the shape check of the scores catches it
        return
    got = out.shape[-1] / 16
    if got != scale:
        raise ValueError(f'--scale: {scale}, but checkpoint {path} upscales by {got:g} with this architecture '
                         f'(-opt / --preset); give --scale {got:g} or the matching data')


def evaluate_checkpoints(checkpoints: Sequence[str | os.PathLike], hr_dir, scale: int, lr_dir=None,
                         network: dict | None = None, param_key: str | None = None, bicubic: bool = False,
                         device: str = 'cpu') -> dict:
    """Evaluate checkpoints (files or benchmark run folders) on one HR folder. Returns
    ``{name: evaluate(...) result}`` (``bicubic`` adds the bicubic baseline)."""
    pairs = load_pairs(hr_dir, scale, lr_dir)
    results = {}
    if bicubic:
        results['bicubic'] = evaluate(None, pairs, scale)
    for ck in checkpoints:
        for name, path, net_opt in find_checkpoints(ck):
            opt = network or net_opt
            if opt is None:
                raise ValueError(f'{path}: give the architecture with -opt (network_g) or --preset')
            net = load_network(build_network(opt), path, param_key).to(device)
            check_upscale(net, scale, path, device)
            try:
                results[name] = evaluate(net, pairs, scale, device)
            except FloatingPointError as e:
                raise FloatingPointError(f'checkpoint {path}: {e}') from None
    return results


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a whole number >= 1, got {text!r}')
    return value


def run(argv=None) -> dict:
    """``krdistill-evaluate``'s work: parse ``argv``, evaluate, print the table (stdout), write
    ``--json``; returns ``{name: evaluate(...) result}``. Errors are raised."""
    import json
    p = argparse.ArgumentParser(prog='krdistill-evaluate',
                                description='Evaluate SR checkpoints (or benchmark run folders) on HR images: '
                                'crop to a multiple of the scale, LR by MATLAB-compatible bicubic (or --lr-dir), '
                                'Y-channel PSNR/SSIM with border = scale, no self-ensemble. Exit code 0 on success.')
    p.add_argument('checkpoints', nargs='*', help='checkpoint files ({"params": ...}) or benchmark run folders')
    p.add_argument('--hr-dir', required=True, help='folder of HR images')
    p.add_argument('--lr-dir', default=None, help='reference LR images with the same file names (default: make them)')
    p.add_argument('--scale', type=_positive_int, required=True)
    p.add_argument('-opt', '--opt', default=None, help='option YAML whose network_g gives the architecture')
    p.add_argument('--network-key', default='network_g', help='section of -opt to use (e.g. network_t)')
    p.add_argument('--preset', default=None, choices=sorted(PRESETS), help='a built-in architecture instead of -opt')
    p.add_argument('--param-key', default=None, help='params | params_ema (default: params_ema if present)')
    p.add_argument('--bicubic', action='store_true', help='also report bicubic upscaling')
    p.add_argument('--json', default=None, help='write the results (per image and mean) here')
    p.add_argument('--device', default='cpu')
    a = p.parse_args(argv)
    if not a.checkpoints and not a.bicubic:
        p.error('give checkpoints or --bicubic')
    network = _network_from_option(a.opt, a.network_key) if a.opt else (PRESETS[a.preset] if a.preset else None)
    res = evaluate_checkpoints(a.checkpoints, a.hr_dir, a.scale, a.lr_dir, network, a.param_key, a.bicubic, a.device)
    print(markdown_table(['model', 'images', 'Y-PSNR', 'Y-SSIM'],
                         [[k, len(v['images']), f'{v["psnr"]:.3f}', f'{v["ssim"]:.4f}'] for k, v in res.items()]))
    if a.json:
        try:
            with open(a.json, 'w') as f:
                json.dump(dict(hr_dir=str(a.hr_dir), lr_dir=a.lr_dir, scale=a.scale, border=a.scale, results=res), f,
                          indent=1)
        except OSError as e:
            raise OSError(f'--json: cannot write {a.json}: {e.strerror or e}') from None
    return res


def main(argv=None) -> int:
    """``krdistill-evaluate`` / ``tools/evaluate.py``: Y-PSNR/SSIM of student checkpoints on a folder.

    Prints the table on stdout and returns 0; an input it cannot evaluate (a missing, damaged,
    pickled or non-finite checkpoint, a bad option file, an image folder without images, a
    non-finite output) prints ``error: ...`` on stderr and returns 1; a usage error exits with 2.
    The results as a dict: :func:`run`.
    """
    import sys
    try:
        run(argv)
    except (OSError, CheckpointError, OptionFileError, FloatingPointError, KeyError, ValueError, RuntimeError) as e:
        print(f'krdistill-evaluate: error: {e.args[0] if isinstance(e, KeyError) and e.args else e}', file=sys.stderr)
        return 1
    return 0
