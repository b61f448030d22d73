"""Pictures of what the KRNets transfer (numpy and OpenCV only; no plotting library needed).

For one LR image and each distillation point: the N dynamic kernels with their weights, the
student's texture maps ``T_s^n``, the teacher's guidance ``T_t^n`` and their difference, plus the
per-texture weights over training when a history is given. Used by ``MetaKDModel`` (written every
``logger.kr_picture_freq`` iterations, default ``logger.save_image_freq``), by ``tools/kr_picture.py`` (any image, from a run's checkpoints) and by the benchmark (``runs/<job>/kr.png``).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

__all__ = ['draw_points', 'render_picture', 'texture_weights']

_CELL = 96
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _label(img: np.ndarray, text: str, scale: float = 0.4) -> np.ndarray:
    out = np.full((16 + img.shape[0], img.shape[1], 3), 255, np.uint8)
    out[16:] = img
    cv2.putText(out, text[:max(1, img.shape[1] // 6)], (2, 12), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _gray(m: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(m.min()) if lo is None else lo
    hi = float(m.max()) if hi is None else hi
    g = np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1)
    g = cv2.resize((g * 255).astype(np.uint8), (_CELL, _CELL), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)


def _kernel(k: np.ndarray) -> np.ndarray:
    a = float(np.abs(k).max()) or 1.0
    rgb = np.zeros(k.shape + (3, ), np.float32)  # red positive, blue negative (BGR)
    rgb[..., 2] = np.clip(k / a, 0, 1)
    rgb[..., 0] = np.clip(-k / a, 0, 1)
    return cv2.resize((rgb * 255).astype(np.uint8), (_CELL, _CELL), interpolation=cv2.INTER_NEAREST)


def _history(history: Sequence[Sequence[float]], n: int) -> np.ndarray:
    """Per-texture weights over training as a small line chart (one colour per texture)."""
    w, h = _CELL * max(n, 2), _CELL
    img = np.full((h, w, 3), 255, np.uint8)
    arr = np.asarray(history, np.float32)
    if arr.ndim != 2 or len(arr) < 2:
        cv2.putText(img, 'weights over training: need 2+ records', (4, h // 2), _FONT, 0.4, (0, 0, 0), 1)
        return _label(img, 'texture weights over training')
    top = max(float(arr.max()), 1e-6)
    xs = np.linspace(4, w - 4, len(arr))
    for j in range(arr.shape[1]):
        hue = int(180 * j / max(1, arr.shape[1]))
        color = cv2.cvtColor(np.uint8([[[hue, 220, 200]]]), cv2.COLOR_HSV2BGR)[0, 0].tolist()
        pts = np.stack([xs, h - 4 - (h - 8) * arr[:, j] / top], 1).astype(np.int32)
        cv2.polylines(img, [pts], False, color, 1, cv2.LINE_AA)
    return _label(img, f'texture weights over training (max {top:.3g})')


def _row(cells: list[np.ndarray]) -> np.ndarray:
    h = max(c.shape[0] for c in cells)
    cells = [np.pad(c, ((0, h - c.shape[0]), (0, 2), (0, 0)), constant_values=255) for c in cells]
    return np.concatenate(cells, 1)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, 0)


def render_picture(lq: np.ndarray, points: list[dict], history: dict | None = None) -> np.ndarray:
    """Compose the picture (uint8 BGR): ``lq`` (H x W x 3 BGR uint8) and per point a dict with
    ``name``, ``kernels`` (N x k x k), ``weights`` (N), ``tex_s`` / ``tex_t`` (N x H x W maps of the
    channel-mean magnitude), optional ``diff`` (N x H x W, mean |T_s - T_t|), ``fitnet_weight`` and ``texture_weight`` (b_tex); ``history``: point name -> list of weight vectors over training."""
    lq_cell = cv2.resize(lq, (_CELL, _CELL), interpolation=cv2.INTER_AREA)
    rows = []
    for p in points:
        n = len(p['weights'])
        head = f'{p["name"]}' + (f'  b_fit {p["fitnet_weight"]:.3f}' if p.get('fitnet_weight') is not None else '') + \
            (f'  b_tex {p["texture_weight"]:.3f}' if p.get('texture_weight') is not None else '')
        strip = np.full((_CELL, max(n, 2) * (_CELL + 2), 3), 255, np.uint8)
        strip[:, :_CELL] = lq_cell
        rows.append(_label(strip, head, 0.45))
        rows.append(_row([_label(_kernel(p['kernels'][i]), f'k{i} a={p["weights"][i]:.3f}') for i in range(n)]))
        hi = float(max(np.abs(p['tex_s']).max(), np.abs(p['tex_t']).max()))
        rows.append(_row([_label(_gray(np.abs(p['tex_s'][i]), 0, hi), f'student T{i}') for i in range(n)]))
        rows.append(_row([_label(_gray(np.abs(p['tex_t'][i]), 0, hi), f'teacher T{i}') for i in range(n)]))
        diff = p['diff'] if 'diff' in p else np.abs(p['tex_s'] - p['tex_t'])
        rows.append(_row([_label(_gray(diff[i], 0, hi), f'|diff| T{i}') for i in range(n)]))
        if history and history.get(p['name']):
            rows.append(_history(history[p['name']], n))
    return _stack(rows)


def _student_features(mkd, lq: torch.Tensor) -> list[torch.Tensor]:
    was = mkd.student.training
    mkd.student.eval()
    try:
        return mkd.student_forward(lq)[1]
    finally:
        mkd.student.train(was)


@torch.no_grad()
def texture_weights(mkd, lq: torch.Tensor, feats_t: list[torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Per distillation point: the KRNet's per-texture weights (branch weight included) on the first
    image of ``lq``; ``feats_t``: the teacher's features on it (default: a teacher forward)."""
    lq = lq[:1]
    feats_t = mkd.teacher_forward(lq)[1] if feats_t is None else feats_t
    return {name: kr(fs, ft)['weights'][0].float().cpu().tolist()
            for name, kr, fs, ft in zip(mkd.student_layers, mkd.krnets, _student_features(mkd, lq), feats_t)}


@torch.no_grad()
def draw_points(mkd, lq: torch.Tensor, history: dict | None = None) -> np.ndarray:
    """The picture for the first image of ``lq`` (B x C x h x w in [0, 1]) under ``mkd``, a
    :class:`~krdistill.metakd.MetaKD`: one teacher and student forward, each KRNet on their features."""
    lq = lq[:1]
    _, feats_t = mkd.teacher_forward(lq)
    feats_s = _student_features(mkd, lq)
    points = []
    for name, kr, fs, ft in zip(mkd.student_layers, mkd.krnets, feats_s, feats_t):
        out = kr(fs.detach(), ft)
        k = out['kernels'][0]
        if k.dim() == 4:  # per-pixel kernels: show the spatial mean
            k = k.mean(dim=(-1, -2)).view(k.shape[0], kr.kernel_size, kr.kernel_size)
        ts, tt = out['tex_s'][0].float(), out['tex_t'][0].float()  # N x C x H x W
        points.append(dict(name=name, kernels=k.float().cpu().numpy(), weights=out['weights'][0].float().cpu().numpy(),
                           tex_s=ts.abs().mean(1).cpu().numpy(), tex_t=tt.abs().mean(1).cpu().numpy(),
                           diff=(ts - tt).abs().mean(1).cpu().numpy(),
                           fitnet_weight=float(out['fit_weight']) if 'fit_weight' in out else None,
                           texture_weight=float(kr.texture_weight.clamp_min(0)) if getattr(kr, 'fitnet_branch', False)
                           else None))
    img = (lq[0].detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)[..., ::-1] * 255).round()
    img = np.ascontiguousarray(img.astype(np.uint8))
    if img.shape[2] != 3:
        img = np.repeat(img[..., :1], 3, axis=2)
    return render_picture(img, points, history)
