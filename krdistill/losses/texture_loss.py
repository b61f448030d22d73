"""Texture-wise distillation loss of MetaKD (torch only): a pure function plus a thin module.

Reconstructed from the abstract of Zhu, Liu, Chen, arXiv 2207.08356 ("decompose the
distillation problem into texture-wise supervision"); design note docs/METAKD.md, section
"Texture-wise loss".
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .kd_loss import fitnet_loss

__all__ = ['texture_wise_loss', 'TextureWiseLoss']

_CRITERIA = ('l1', 'charbonnier')
_REDUCTIONS = ('mean', 'sum', 'none')


def _check_options(criterion: str, reduction: str, eps: float) -> None:
    if criterion not in _CRITERIA:
        raise ValueError(f'texture_wise_loss: criterion must be one of {_CRITERIA}, got {criterion!r}.')
    if reduction not in _REDUCTIONS:
        raise ValueError(f'texture_wise_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}.')
    if criterion == 'charbonnier' and not eps > 0:
        raise ValueError(f'texture_wise_loss: charbonnier needs eps > 0, got {eps!r}.')


def texture_wise_loss(tex_s: Tensor,
                      tex_t: Tensor,
                      weights: Tensor,
                      criterion: str = 'l1',
                      eps: float = 1e-3,
                      reduction: str = 'mean') -> Tensor:
    r"""Weighted sum over textures of the mean distance between student and teacher textures.

    .. math::

        L_{tex}(b) = \sum_{n=1}^{N} a_{b,n} \, \mathrm{mean}_{c,h,w}\,
                     \rho\big(T_s^{n}(b) - T_t^{n}(b)\big),
        \qquad \rho(d) = |d| \;\; (\text{l1}) \quad\text{or}\quad \sqrt{d^2 + \epsilon^2}
        \;\; (\text{charbonnier})

    Args:
        tex_s: student textures ``B x N x *`` (from KRNet: ``B x N x C x H x W``).
        tex_t: teacher guidance, same shape as ``tex_s``.
        weights: texture weights ``a``, ``B x N`` (or ``N``, shared by the batch); from KRNet
            they are a softmax over ``N``.
        criterion: ``'l1'`` (default) or ``'charbonnier'``. Note that Charbonnier gives
            ``eps * sum_n a_n`` (not 0) for identical inputs. In meta training the KRNet's
            gradient comes from differentiating ``grad_theta L_tex``, which involves
            ``rho''``: it is 0 almost everywhere for L1, so the teacher guidance ``T_t`` then
            shapes the meta gradient only through the kernels and weights; Charbonnier
            (``rho'' = eps^2 / (d^2 + eps^2)^(3/2)``) adds the direct path, larger for larger eps.
        eps: Charbonnier constant. Default 1e-3.
        reduction: ``'mean'`` (default: batch mean of the per-sample loss), ``'sum'`` (batch
            sum) or ``'none'`` (the per-sample vector, shape ``B``).

    Returns:
        A scalar, or a ``B`` vector for ``reduction='none'``.
    """
    _check_options(criterion, reduction, eps)
    for name, t in (('tex_s', tex_s), ('tex_t', tex_t), ('weights', weights)):
        if not torch.is_tensor(t):
            raise TypeError(f'texture_wise_loss: {name} must be a Tensor, got {type(t).__name__}.')
    if tex_s.dim() < 3:
        raise ValueError(f'texture_wise_loss: tex_s must be B x N x ... (at least 3-D, KRNet gives B x N x C x H x W), '
                         f'got shape {tuple(tex_s.shape)}.')
    if tex_s.shape != tex_t.shape:
        raise ValueError(f'texture_wise_loss: tex_s and tex_t shapes differ: {tuple(tex_s.shape)} vs '
                         f'{tuple(tex_t.shape)}.')
    b, n = tex_s.shape[:2]
    if weights.dim() == 1:
        weights = weights.unsqueeze(0)
    if weights.dim() != 2 or weights.shape[1] != n or weights.shape[0] not in (1, b):
        raise ValueError(f'texture_wise_loss: weights must be B x N = {b} x {n} (or N = {n}) to match tex_s '
                         f'{tuple(tex_s.shape)}, got shape {tuple(weights.shape)}.')

    diff = tex_s - tex_t
    if criterion == 'l1':
        dist = diff.abs()
    else:
        dist = torch.sqrt(diff * diff + eps * eps)
    per_texture = dist.flatten(2).mean(dim=2)  # B x N
    per_sample = (weights * per_texture).sum(dim=1)  # B
    if reduction == 'mean':
        return per_sample.mean()
    if reduction == 'sum':
        return per_sample.sum()
    return per_sample


KROutput = Mapping[str, Tensor]


class TextureWiseLoss(nn.Module):
    r"""Texture-wise distillation loss ``loss_weight * L_tex`` (MetaKD, arXiv 2207.08356).

    .. math::

        L_{tex} = \sum_{n} a_n \, \mathrm{mean}\,\rho(T_s^n - T_t^n)

    summed over distillation points when given several KRNet outputs. See
    :func:`texture_wise_loss` for the formula and shapes.

    YAML (``train`` section)::

        texture_opt:
          type: TextureWiseLoss
          loss_weight: 1.0
          criterion: l1        # or charbonnier (with eps)
          reduction: mean

    Args:
        loss_weight: multiplier (``lambda_tex``). Default 1.0.
        criterion: ``'l1'`` (default) or ``'charbonnier'``.
        eps: Charbonnier constant. Default 1e-3.
        reduction: ``'mean'`` (default), ``'sum'`` or ``'none'``.

    Forward:
        ``loss(tex_s, tex_t, weights)`` with the shapes of :func:`texture_wise_loss`, or
        ``loss(kr_out)`` with a KRNet output dict (keys ``tex_s``, ``tex_t``, ``weights``), or
        ``loss([kr_out_1, kr_out_2, ...])``: the sum over distillation points.
    """

    def __init__(self, loss_weight: float = 1.0, criterion: str = 'l1', eps: float = 1e-3,
                 reduction: str = 'mean') -> None:
        super().__init__()
        _check_options(criterion, reduction, eps)  # fail at build time, naming the option
        self.loss_weight = float(loss_weight)
        self.criterion = criterion
        self.eps = float(eps)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (f'loss_weight={self.loss_weight:g}, criterion={self.criterion!r}, eps={self.eps:g}, '
                f'reduction={self.reduction!r}')

    def _one(self, tex_s: Tensor, tex_t: Tensor, weights: Tensor) -> Tensor:
        return texture_wise_loss(tex_s, tex_t, weights, self.criterion, self.eps, self.reduction)

    def _point(self, out: KROutput) -> Tensor:
        """One KRNet output: the texture term, plus ``fit_weight * mean|fit_s - fit_t|`` (FitNet's L1)
        when the KRNet has a FitNet branch."""
        # texture maps left out at b_tex = 0 (KRNet texture='skip_zero'): the texture term is exactly 0
        loss = None if out.get('tex_s') is None and 'fit_s' in out else self._one(*self._unpack(out))
        if 'fit_s' in out:  # FitNet's loss on the branch's regressed feature (the regressor ran in the KRNet)
            fit = out['fit_weight'] * fitnet_loss(out['fit_s'], out['fit_t'], reduction=self.reduction)
            loss = fit if loss is None else loss + fit
        return loss

    @staticmethod
    def _unpack(out: KROutput) -> tuple[Tensor, Tensor, Tensor]:
        missing = [k for k in ('tex_s', 'tex_t', 'weights') if k not in out]
        if missing:
            raise KeyError(f'TextureWiseLoss: KRNet output is missing keys {missing} (has {sorted(out)}).')
        return out['tex_s'], out['tex_t'], out['weights']

    def forward(self,
                tex_s: Union[Tensor, KROutput, Sequence[KROutput]],
                tex_t: Tensor | None = None,
                weights: Tensor | None = None) -> Tensor:
        if torch.is_tensor(tex_s):
            if tex_t is None or weights is None:
                raise TypeError('TextureWiseLoss: call loss(tex_s, tex_t, weights) or loss(kr_out).')
            return self.loss_weight * self._one(tex_s, tex_t, weights)
        if tex_t is not None or weights is not None:
            raise TypeError('TextureWiseLoss: with a KRNet output dict, pass no tex_t / weights.')
        if isinstance(tex_s, Mapping):
            return self.loss_weight * self._point(tex_s)
        outs = list(tex_s)
        if not outs:
            raise ValueError('TextureWiseLoss: got an empty list of KRNet outputs.')
        # stack().sum() keeps the graph (never torch.tensor([...])).
        return self.loss_weight * torch.stack([self._point(o) for o in outs]).sum(dim=0)
