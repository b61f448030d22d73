"""Hand-crafted knowledge-distillation losses for SR: the baselines MetaKD competes against.

Each loss is a pure function of ``(student, teacher)`` tensors plus a thin ``nn.Module``
(``loss_weight``, ``reduction``), torch only. The modules are registered in BasicSR's
LOSS_REGISTRY by ``krdistill/losses/__init__.py``.

Feature losses are built once per distillation point (a teacher/student module pair); the
model passes ``s_channels`` / ``t_channels`` (read from one dummy forward) to constructors
that accept them, so only :class:`FitNetLoss` (which owns a regressor) needs them.

Teacher tensors are treated as constants by the callers (recorded under ``no_grad``); these
functions do not detach anything themselves, so they stay usable for other purposes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'output_kd_loss', 'fitnet_loss', 'attention_map', 'at_loss', 'spatial_affinity', 'fakd_loss',
    'OutputKDLoss', 'FitNetLoss', 'ATLoss', 'FAKDLoss', 'PixelLoss'
]

_REDUCTIONS = ('mean', 'sum', 'none')


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == 'mean':
        return per_sample.mean()
    if reduction == 'sum':
        return per_sample.sum()
    return per_sample


def _check_4d(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f'{name} must be a B x C x H x W tensor, got {shape}')


def _match_size(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Resize the teacher map ``t`` to the student's spatial size if they differ."""
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode='bilinear', align_corners=False)
    return t


def _dist(d: torch.Tensor, criterion: str) -> torch.Tensor:
    if criterion == 'l1':
        return d.abs()
    if criterion == 'l2':
        return d.pow(2)
    raise ValueError(f"criterion must be 'l1' or 'l2', got {criterion!r}")


def output_kd_loss(out_s: torch.Tensor, out_t: torch.Tensor, criterion: str = 'l1',
                   reduction: str = 'mean') -> torch.Tensor:
    """Output distillation: ``mean_b mean_chw |S(x) - T(x)|`` (``criterion='l2'``: squared).

    Args:
        out_s: student SR output, B x C x H x W.
        out_t: teacher SR output, same shape.
    """
    _check_4d('out_s', out_s)
    _check_4d('out_t', out_t)
    _check_reduction(reduction)
    if out_s.shape != out_t.shape:
        raise ValueError(f'student and teacher outputs differ in shape: {tuple(out_s.shape)} vs '
                         f'{tuple(out_t.shape)} (do network_g and network_t have the same upscale?)')
    return _reduce(_dist(out_s - out_t, criterion).flatten(1).mean(1), reduction)


def fitnet_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, regressor: nn.Module | None = None,
                criterion: str = 'l1', reduction: str = 'mean') -> torch.Tensor:
    """FitNet (Romero et al., ICLR 2015): ``mean |r(F_s) - F_t|`` with a learned regressor ``r``.

    Args:
        feat_s: student feature, B x Cs x H x W.
        feat_t: teacher feature, B x Ct x H' x W' (resized to H x W if needed).
        regressor: maps Cs -> Ct channels (identity if None; then Cs must equal Ct).
        criterion: 'l1' (SR practice, default) or 'l2' (the original FitNet).
    """
    _check_4d('feat_s', feat_s)
    _check_4d('feat_t', feat_t)
    _check_reduction(reduction)
    if regressor is not None:
        feat_s = regressor(feat_s)
    if feat_s.shape[1] != feat_t.shape[1]:
        raise ValueError(f'FitNet: student feature has {feat_s.shape[1]} channels after the regressor, '
                         f'teacher {feat_t.shape[1]}')
    feat_t = _match_size(feat_s, feat_t)
    return _reduce(_dist(feat_s - feat_t, criterion).flatten(1).mean(1), reduction)


def attention_map(feat: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """Spatial attention ``Q = normalize(flatten(mean_c |F|^p))``: B x (H*W), unit L2 norm."""
    _check_4d('feat', feat)
    q = feat.abs().pow(p).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(eps)


def at_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, p: float = 2.0, reduction: str = 'mean') -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``mean_x (Q_s(x) - Q_t(x))^2``.

    Channel counts may differ; the teacher map is resized to the student's size if needed.
    """
    _check_4d('feat_s', feat_s)
    _check_4d('feat_t', feat_t)
    _check_reduction(reduction)
    feat_t = _match_size(feat_s, feat_t)
    return _reduce((attention_map(feat_s, p) - attention_map(feat_t, p)).pow(2).mean(1), reduction)


def spatial_affinity(feat: torch.Tensor, max_size: int = 32, eps: float = 1e-12) -> torch.Tensor:
    """FAKD spatial affinity ``A = Fn^T Fn`` of channel-normalised positions: B x HW x HW.

    To fit memory on large maps the feature is first average-pooled (adaptive) so that neither
    side exceeds ``max_size`` (default 32: at most 1024 positions, a 1024 x 1024 matrix per
    sample). ``max_size=0`` disables pooling (exact FAKD, memory O((HW)^2)).
    """
    _check_4d('feat', feat)
    h, w = feat.shape[-2:]
    if max_size and (h > max_size or w > max_size):
        feat = F.adaptive_avg_pool2d(feat, (min(h, max_size), min(w, max_size)))
    f = feat.flatten(2)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(eps)
    return f.transpose(1, 2) @ f


def fakd_loss(feat_s: torch.Tensor, feat_t: torch.Tensor, max_size: int = 32, criterion: str = 'l1',
              reduction: str = 'mean') -> torch.Tensor:
    """FAKD (He et al., ICIP 2020): ``mean |A_s - A_t|`` between spatial affinity matrices.

    See :func:`spatial_affinity` for the pooling that bounds memory.
    """
    _check_4d('feat_s', feat_s)
    _check_4d('feat_t', feat_t)
    _check_reduction(reduction)
    feat_t = _match_size(feat_s, feat_t)
    a_s = spatial_affinity(feat_s, max_size)
    a_t = spatial_affinity(feat_t, max_size)
    return _reduce(_dist(a_s - a_t, criterion).flatten(1).mean(1), reduction)


class _KDLoss(nn.Module):
    """Common ``loss_weight`` / ``reduction`` handling."""

    tag = 'kd'

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean'):
        super().__init__()
        _check_reduction(reduction)
        self.loss_weight = loss_weight
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}, reduction={self.reduction!r}'


class OutputKDLoss(_KDLoss):
    """Output KD: ``loss_weight * |S(x) - T(x)|``. YAML: ``output_kd_opt: {type: OutputKDLoss, loss_weight: 1.0}``."""

    tag = 'out'

    def __init__(self, loss_weight: float = 1.0, criterion: str = 'l1', reduction: str = 'mean'):
        super().__init__(loss_weight, reduction)
        self.criterion = criterion

    def forward(self, out_s: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * output_kd_loss(out_s, out_t, self.criterion, self.reduction)


class FitNetLoss(_KDLoss):
    """FitNet with a learned 1x1 regressor (student -> teacher channels), one per distillation point.

    YAML: ``kd_opt: {type: FitNetLoss, loss_weight: 1.0, criterion: l1}``; ``s_channels`` and
    ``t_channels`` are filled in by the model from a dummy forward. The regressor is a
    training-only parameter, saved with the KD state (``net_kd_<iter>.pth``) and resumed.
    """

    tag = 'fitnet'

    def __init__(self, s_channels: int, t_channels: int, loss_weight: float = 1.0, criterion: str = 'l1',
                 reduction: str = 'mean'):
        super().__init__(loss_weight, reduction)
        self.criterion = criterion
        self.regressor = nn.Conv2d(s_channels, t_channels, 1)

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * fitnet_loss(feat_s, feat_t, self.regressor, self.criterion, self.reduction)


class ATLoss(_KDLoss):
    """Attention transfer. YAML: ``kd_opt: {type: ATLoss, loss_weight: 1.0, p: 2}``."""

    tag = 'at'

    def __init__(self, loss_weight: float = 1.0, p: float = 2.0, reduction: str = 'mean'):
        super().__init__(loss_weight, reduction)
        self.p = p

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * at_loss(feat_s, feat_t, self.p, self.reduction)


class FAKDLoss(_KDLoss):
    """FAKD spatial-affinity distillation on maps pooled to at most ``max_size`` per side.

    YAML: ``kd_opt: {type: FAKDLoss, loss_weight: 1.0, max_size: 32}``.
    """

    tag = 'fakd'

    def __init__(self, loss_weight: float = 1.0, max_size: int = 32, criterion: str = 'l1', reduction: str = 'mean'):
        super().__init__(loss_weight, reduction)
        self.max_size = max_size
        self.criterion = criterion

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * fakd_loss(feat_s, feat_t, self.max_size, self.criterion, self.reduction)


class PixelLoss(nn.Module):
    """Reconstruction loss ``loss_weight * reduce(rho(pred - target))`` with the arithmetic of
    BasicSR's ``L1Loss`` / ``MSELoss`` / ``CharbonnierLoss`` (elementwise, then mean or sum), for
    loops without BasicSR (the torch-only table of :mod:`krdistill.build` maps those names here).

    Args:
        criterion: ``'l1'``, ``'l2'`` or ``'charbonnier'`` (``sqrt(d^2 + eps)``, BasicSR's eps 1e-12).
    """

    def __init__(self, criterion: str = 'l1', loss_weight: float = 1.0, reduction: str = 'mean', eps: float = 1e-12):
        super().__init__()
        if criterion not in ('l1', 'l2', 'charbonnier'):
            raise ValueError(f"criterion must be 'l1', 'l2' or 'charbonnier', got {criterion!r}")
        _check_reduction(reduction)
        self.criterion, self.loss_weight, self.reduction, self.eps = criterion, loss_weight, reduction, eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = pred - target
        rho = torch.sqrt(d * d + self.eps) if self.criterion == 'charbonnier' else _dist(d, self.criterion)
        return self.loss_weight * _reduce(rho, self.reduction)

    def extra_repr(self) -> str:
        return f'criterion={self.criterion!r}, loss_weight={self.loss_weight}, reduction={self.reduction!r}'
