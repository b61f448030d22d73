"""Data upcycling (DUKD): more teacher knowledge from the same training patches (torch only).

Zhang et al., "Data Upcycling Knowledge Distillation for Image Super-Resolution" (reference code:
yun224/DUKD, on BasicSR). Three additions to output KD, written here from the paper's description
and our reading of the reference's ``DUKD.optimize_parameters``:

* **zoom-in**: LR-sized tiles of the ground truth (a patch of ``s x s`` tiles at scale ``s``) go
  through the teacher; the student learns the teacher's super-resolution of them
  (``l_zoom_in = w_in * rho(S(tile), T(tile))``);
* **zoom-out**: the LR input is downscaled once more (MATLAB bicubic, as the data); the student's
  output of it is trained towards the LR image and towards the teacher's output of it
  (``l_zoom_out_pix = w_out_pix * rho(S(lq_down), lq)``, ``l_zoom_out_kd = w_out * rho(S(lq_down), T(lq_down))``);
* **label consistency**: invertible augmentations (colour inversion ``1 - x``, horizontal flip,
  vertical flip, transpose; each applied to a sample with probability ``aug_prob``) are applied to
  the student's upcycled inputs and undone on its output, so the labels (the teacher's outputs of
  the unaugmented inputs, the LR image) stay as they are.

Where we differ from the reference, and why:

* The reference takes **two optimizer steps** per iteration (the usual pixel + output KD step, then
  one on the upcycled terms); ``steps: 1`` (our default) adds the upcycled terms to the one
  student objective, so a run has as many optimizer steps as any other row and the terms combine
  with feature KD and MetaKD's virtual step. ``steps: 2`` is the reference's schedule; logs and
  benchmark rows say which one ran.
* The reference draws the same tile positions for the whole batch; we draw them per sample
  (``zoom_in`` distinct tiles of each patch).
* The reference's label-consistency augmentations are undone by applying them again in the same
  order, which is not the inverse when a flip and the transpose hit the same sample (it rotates
  that sample's output by 180 degrees). We undo them in reverse order: exact.
* The reference augments only the zoom-in inputs; we augment both upcycled inputs (the paper
  describes the augmentations for the upcycled data). Transpose needs square inputs and is
  skipped for non-square ones.
* The reference weights its pixel terms 5x its KD terms (``pixel_opt.loss_weight: 5``); here every
  weight is its own key (defaults 1), next to the run's own pixel and output-KD weights.

Options (``train.upcycle_opt`` in a BasicSR option file; :func:`check_upcycle_options`)::

    upcycle_opt:
      zoom_in: 1          # LR-sized GT tiles per patch (0: no zoom-in)
      zoom_out: true
      aug_prob: 0.3       # label-consistency augmentations (0: none)
      zoom_in_weight: 1.0
      zoom_out_weight: 1.0        # towards the teacher's output of the zoomed-out input
      zoom_out_pixel_weight: 1.0  # towards the LR image
      criterion: l1       # l1, l2 or charbonnier
      steps: 1            # 1: one optimizer step with every term; 2: the reference's second step
"""
from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from .losses.kd_loss import PixelLoss
from .option_checks import check_keys
from .resize import contributions

__all__ = ['UpcycleOptions', 'Upcycled', 'Upcycler', 'check_upcycle_options', 'zoom_in_tiles', 'zoom_out',
           'bicubic_down', 'augment', 'unaugment', 'AUGMENTATIONS']

#: the label-consistency augmentations, in the order they are applied (undone in reverse)
AUGMENTATIONS = ('invert', 'hflip', 'vflip', 'transpose')


@dataclasses.dataclass(frozen=True)
class UpcycleOptions:
    """The ``upcycle_opt`` block (see the module docstring)."""
    zoom_in: int = 1
    zoom_out: bool = True
    aug_prob: float = 0.3
    zoom_in_weight: float = 1.0
    zoom_out_weight: float = 1.0
    zoom_out_pixel_weight: float = 1.0
    criterion: str = 'l1'
    steps: int = 1


def _number(value, key: str, minimum: float, maximum: float | None = None, integer: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or value < minimum or (maximum is not None and value > maximum):
        what = 'an integer' if integer else 'a number'
        rng = f'>= {minimum}' if maximum is None else f'in [{minimum}, {maximum}]'
        raise ValueError(f'{key}: must be {what} {rng}, got {value!r}')
    return int(value) if integer else float(value)


def check_upcycle_options(opt: Mapping | UpcycleOptions | None, key: str = 'upcycle_opt',
                          scale: int | None = None) -> UpcycleOptions | None:
    """The checked options (None when ``opt`` is None). Errors name ``key`` and the nearest known
    key; ``scale`` (when known) bounds ``zoom_in`` by the ``scale**2`` tiles of a patch."""
    if opt is None or isinstance(opt, UpcycleOptions):
        return opt
    if not isinstance(opt, Mapping):
        raise TypeError(f'{key}: must be a mapping like {{zoom_in: 1, zoom_out: true, aug_prob: 0.3}}, '
                        f'got {type(opt).__name__}')
    known = [f.name for f in dataclasses.fields(UpcycleOptions)]
    check_keys(opt, known, key)
    o = dict(opt)
    out = UpcycleOptions(
        zoom_in=_number(o.get('zoom_in', 1), f'{key}.zoom_in', 0, scale * scale if scale else None, integer=True),
        zoom_out=o.get('zoom_out', True),
        aug_prob=_number(o.get('aug_prob', 0.3), f'{key}.aug_prob', 0, 1),
        zoom_in_weight=_number(o.get('zoom_in_weight', 1.0), f'{key}.zoom_in_weight', 0),
        zoom_out_weight=_number(o.get('zoom_out_weight', 1.0), f'{key}.zoom_out_weight', 0),
        zoom_out_pixel_weight=_number(o.get('zoom_out_pixel_weight', 1.0), f'{key}.zoom_out_pixel_weight', 0),
        criterion=o.get('criterion', 'l1'),
        steps=_number(o.get('steps', 1), f'{key}.steps', 1, 2, integer=True))
    if not isinstance(out.zoom_out, bool):
        raise TypeError(f'{key}.zoom_out: true or false, got {out.zoom_out!r}')
    if out.criterion not in ('l1', 'l2', 'charbonnier'):
        raise ValueError(f'{key}.criterion: l1, l2 or charbonnier, got {out.criterion!r}')
    if out.zoom_in == 0 and not out.zoom_out:
        raise ValueError(f'{key}: zoom_in is 0 and zoom_out is false, so nothing is upcycled; '
                         f'set one of them or remove {key}')
    return out


# ------------------------------------------------------------------------------ the upcycled inputs
def zoom_in_tiles(gt: torch.Tensor, scale: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` distinct LR-sized tiles of each ground-truth patch (its ``scale x scale`` grid), drawn
    per sample; ``B*n x C x H/scale x W/scale``, sample-major (the tiles of sample 0 first)."""
    b, c, hh, ww = gt.shape
    if hh % scale or ww % scale:
        raise ValueError(f'zoom-in: the GT patch ({hh} x {ww}) is not a multiple of the scale {scale}')
    h, w = hh // scale, ww // scale
    tiles = gt.reshape(b, c, scale, h, scale, w).permute(0, 2, 4, 1, 3, 5).reshape(b, scale * scale, c, h, w)
    pick = torch.rand(b, scale * scale, generator=generator).argsort(dim=1)[:, :n].to(gt.device)
    return tiles[torch.arange(b, device=gt.device)[:, None], pick].reshape(b * n, c, h, w)


@functools.lru_cache(maxsize=32)
def _down_matrix(length: int, scale: int) -> np.ndarray:
    out = -(-length // scale)
    weights, indices = contributions(length, out, 1.0 / scale, 4.0, True)
    mat = np.zeros((out, length))
    for k in range(weights.shape[1]):
        np.add.at(mat, (np.arange(out), indices[:, k]), weights[:, k])
    return mat


def bicubic_down(x: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB ``imresize(x, 1/scale, 'bicubic')`` (antialiased, replicated edges) on a float batch
    ``B x C x H x W``, without the rounding to uint8: the same kernel the data were made with."""
    mh = torch.as_tensor(_down_matrix(x.shape[-2], scale), dtype=x.dtype, device=x.device)
    mw = torch.as_tensor(_down_matrix(x.shape[-1], scale), dtype=x.dtype, device=x.device)
    return torch.einsum('oh,bchw,pw->bcop', mh, x, mw)


def zoom_out(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR batch downscaled once more by ``scale`` (:func:`bicubic_down`)."""
    return bicubic_down(lq, scale)


def augment(x: torch.Tensor, ops: torch.Tensor, img_range: float = 1.0) -> torch.Tensor:
    """Apply the label-consistency augmentations: ``ops`` is ``B x 4`` bool (:data:`AUGMENTATIONS`
    order); transpose only on square inputs."""
    m = ops.to(x.device).view(-1, len(AUGMENTATIONS), 1, 1, 1)
    x = torch.where(m[:, 0], img_range - x, x)
    x = torch.where(m[:, 1], x.flip(-1), x)
    x = torch.where(m[:, 2], x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(m[:, 3], x.transpose(-2, -1), x)
    return x


def unaugment(y: torch.Tensor, ops: torch.Tensor, img_range: float = 1.0) -> torch.Tensor:
    """The inverse of :func:`augment` with the same ``ops`` (each op is its own inverse; undone in
    reverse order). Works on the student's output of the augmented input (any scale)."""
    m = ops.to(y.device).view(-1, len(AUGMENTATIONS), 1, 1, 1)
    if y.shape[-1] == y.shape[-2]:
        y = torch.where(m[:, 3], y.transpose(-2, -1), y)
    y = torch.where(m[:, 2], y.flip(-2), y)
    y = torch.where(m[:, 1], y.flip(-1), y)
    return torch.where(m[:, 0], img_range - y, y)


@dataclasses.dataclass
class Upcycled:
    """One batch's upcycled data: inputs, the teacher's outputs of them (no graph), and the
    student-side augmentations. ``None`` fields are switched off."""
    zin: torch.Tensor | None = None       # zoom-in tiles (B*n x C x h x w)
    zin_t: torch.Tensor | None = None     # teacher(zin)
    zout: torch.Tensor | None = None      # zoomed-out LR (B x C x h/s x w/s)
    zout_t: torch.Tensor | None = None    # teacher(zout)
    lq: torch.Tensor | None = None        # the zoom-out pixel target
    zin_ops: torch.Tensor | None = None   # B*n x 4 bool
    zout_ops: torch.Tensor | None = None  # B x 4 bool


class Upcycler(nn.Module):
    """Makes a batch's :class:`Upcycled` data and its loss terms (no parameters).

    Random choices (tiles, augmentations) come from torch's global CPU generator, so a seeded run
    and an exact resume (which restores the generator) repeat them.
    """

    def __init__(self, options: UpcycleOptions | Mapping | None, scale: int, key: str = 'upcycle_opt'):
        super().__init__()
        self.options = check_upcycle_options(options if options is not None else {}, key, scale)
        self.scale = int(scale)
        self.key = key
        self.rho = PixelLoss(self.options.criterion)

    def extra_repr(self) -> str:
        return f'scale={self.scale}, {self.options}'

    def augmentations(self, n: int) -> torch.Tensor | None:
        """``n x 4`` bool: which label-consistency augmentations each of ``n`` samples gets (None: off)."""
        p = self.options.aug_prob
        return torch.rand(n, len(AUGMENTATIONS)) < p if p > 0 else None

    def inputs(self, lq: torch.Tensor, gt: torch.Tensor) -> Upcycled:
        """The upcycled inputs of a batch, without the teacher's outputs."""
        o = self.options
        up = Upcycled(lq=lq)
        if o.zoom_in:
            up.zin = zoom_in_tiles(gt, self.scale, o.zoom_in)
            up.zin_ops = self.augmentations(up.zin.shape[0])
        if o.zoom_out:
            up.zout = zoom_out(lq, self.scale)
            up.zout_ops = self.augmentations(up.zout.shape[0])
        return up

    @torch.no_grad()
    def teach(self, teacher: Callable[[torch.Tensor], torch.Tensor], up: Upcycled) -> Upcycled:
        """Fill in the teacher's outputs of the upcycled inputs (``teacher``: the frozen network)."""
        if up.zin is not None and up.zin_t is None:
            up.zin_t = teacher(up.zin)
        if up.zout is not None and up.zout_t is None:
            up.zout_t = teacher(up.zout)
        return up

    def _student(self, student: Callable, x: torch.Tensor, ops: torch.Tensor | None) -> torch.Tensor:
        if ops is None:
            return student(x)
        return unaugment(student(augment(x, ops)), ops)

    def terms(self, student: Callable[[torch.Tensor], torch.Tensor], up: Upcycled) -> 'OrderedDict[str, torch.Tensor]':
        """The upcycled loss terms (``l_zoom_in``, ``l_zoom_out_pix``, ``l_zoom_out_kd``), with graph
        through ``student`` (called on each upcycled input)."""
        o, terms = self.options, OrderedDict()
        if up.zin is not None:
            if up.zin_t is None:
                raise ValueError('Upcycler.terms: the teacher outputs of the zoom-in tiles are missing (Upcycler.teach)')
            terms['l_zoom_in'] = o.zoom_in_weight * self.rho(self._student(student, up.zin, up.zin_ops), up.zin_t)
        if up.zout is not None:
            sr = self._student(student, up.zout, up.zout_ops)
            terms['l_zoom_out_pix'] = o.zoom_out_pixel_weight * self.rho(sr, up.lq)
            if up.zout_t is None:
                raise ValueError('Upcycler.terms: the teacher output of the zoomed-out input is missing')
            terms['l_zoom_out_kd'] = o.zoom_out_weight * self.rho(sr, up.zout_t)
        return terms
