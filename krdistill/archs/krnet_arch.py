"""KRNet: the knowledge representation network of one distillation point (torch only).

Reconstructed from the abstract of Zhu, Liu, Chen, "Learning Knowledge Representation with
Meta Knowledge Distillation for Single Image Super-Resolution", arXiv 2207.08356 (2022); no
public code exists. Design note: docs/METAKD.md, section "KRNet".

**Normalisation and collapse.** If the KRNet minimised the texture loss itself (the
``joint`` ablation), bias-free adapters could simply shrink ``P_s, P_t`` to zero and make
``L_tex = 0``; the student could likewise lower ``L_tex`` by scaling its hooked features
down and compensating in later layers. Default ``normalize='rms'`` removes that degree of
freedom on both sides::

    norm(P) = (P - mean_HW(P)) / sqrt(mean_CHW((P - mean_HW(P))^2) + eps)    (per sample)

The per-channel spatial mean is removed (a zero-mean kernel ignores it anyway) and the
remaining (AC) energy is fixed to 1 per element, so textures cannot vanish by scaling.
Unlike per-pixel channel normalisation (``'pixel'``) it keeps the relative texture contrast
between flat and detailed regions and does not amplify noise where features are near zero,
which keeps meta mode meaningful (the student is asked to match the teacher's texture
structure up to one global scale per sample). The adapters have no bias, because a
constant output would survive normalisation as a shared flat map with zero texture. What
``joint`` mode can still do is *prefer* easy textures (smooth channel mixtures, kernels
and weights ``a_n`` on the bands where student and teacher already agree); that is not a
trivial zero and is exactly what the meta objective (default) is there to prevent.
``'pixel'`` (unit channel vector per pixel) and ``'none'`` (raw, the collapse-prone
variant) are options for ablations.

**Initialisation.** The kernel head's bias holds a bank of diverse high-pass kernels
(orthonormal when ``N <= k*k - 1``) and its weights are scaled by 0.1, the weight-logit
head starts near zero: training starts from uniform weights ``a_n ~ 1/N`` and
well-conditioned, input-modulated, unit-norm kernels (the normalisation's gradient scales
as ``1/||raw||``, so raw kernels are kept at norm ~1 rather than near 0).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ['KRNet']

_NORMALIZE = ('rms', 'pixel', 'none')
_TEXTURE = ('weighted', 'unit', 'skip_zero')


def _nonneg(w: Tensor) -> Tensor:
    """Straight-through clamp at 0: the value of ``max(w, 0)``, the gradient of ``w``.

    A plain ``clamp_min(0)`` has zero gradient below 0: a learned weight that starts at 0 (the
    FitNet branch's ``b_tex``) and takes one negative meta step would never move again.
    """
    return w + (w.clamp_min(0) - w).detach()


def _highpass_bank(num: int, taps: int) -> Tensor:
    """``num`` random zero-mean, unit-norm kernels of ``taps`` taps (``num x taps``).

    When ``num <= taps - 1`` they are orthonormal (for N = 8, k = 3 an orthonormal basis of all
    3x3 high-pass kernels), so the initial textures are diverse rather than random near-copies.
    """
    bank = torch.randn(taps, num)
    bank = bank - bank.mean(dim=0, keepdim=True)
    if num <= taps - 1:
        bank, _ = torch.linalg.qr(bank)  # columns stay in the zero-mean subspace
        bank = bank - bank.mean(dim=0, keepdim=True)  # remove round-off
    bank = bank / bank.norm(dim=0, keepdim=True)
    return bank.t().contiguous()


def _normalize_taps(raw: Tensor, dim: int, eps: float) -> Tensor:
    """Zero mean and unit L2 norm over the tap dimension ``dim`` (texture = high-pass)."""
    w = raw - raw.mean(dim=dim, keepdim=True)
    return w * torch.rsqrt(w.pow(2).sum(dim=dim, keepdim=True) + eps)


def _unfold_texture(padded: Tensor, kernels: Tensor, k: int, h: int, w: int) -> Tensor:
    """Per-sample depthwise correlation as unfold + batched matmul: ``B x C x (H+k-1) x (W+k-1)``
    maps and ``B x N x k*k`` kernels -> ``B x N x C x H x W``.

    Same result as one grouped ``F.conv2d`` with the batch folded into the channels, but its
    double backward (the exact meta step) is a few batched matmuls instead of PyTorch's
    per-group loop over ``B x C`` tiny convolutions (H200, EDSR-L -> EDSR, 4 points: exact meta
    step 0.89 s -> 0.08 s; BENCHMARKS.md, "Step cost"), at the price of keeping the unfolded
    input (k*k times the padded maps) for backward.
    """
    b, c = padded.shape[:2]
    cols = F.unfold(padded, k).view(b, c, k * k, h * w)
    return torch.einsum('bckl,bnk->bncl', cols, kernels).reshape(b, kernels.shape[1], c, h, w)


def _check_options(s_channels, t_channels, width, num_kernels, kernel_size, corr_radius, hidden, normalize,
                   dynamic, per_pixel, texture_init) -> None:
    """KRNet's arguments; errors name the argument (the ``network_kr`` key)."""
    for name, value in (('s_channels', s_channels), ('t_channels', t_channels), ('num_kernels', num_kernels),
                        ('hidden', hidden)):
        if int(value) < 1:
            raise ValueError(f'KRNet: {name} must be a positive integer, got {value!r}.')
    if width is not None and int(width) < 1:
        raise ValueError(f'KRNet: width must be a positive integer or None, got {width!r}.')
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f'KRNet: kernel_size must be odd and >= 3 (a zero-mean 1x1 kernel is zero), '
                         f'got {kernel_size}.')
    if corr_radius < 0:
        raise ValueError(f'KRNet: corr_radius must be >= 0, got {corr_radius}.')
    if normalize not in _NORMALIZE:
        raise ValueError(f'KRNet: normalize must be one of {_NORMALIZE}, got {normalize!r}.')
    if per_pixel and not dynamic:
        raise ValueError('KRNet: per_pixel=True needs dynamic=True (static kernels are the same everywhere).')
    if isinstance(texture_init, bool) or not isinstance(texture_init, (int, float)) or texture_init < 0:
        raise ValueError(f'KRNet: texture_init must be a number >= 0, got {texture_init!r}.')


def _check_features(kr: 'KRNet', feat_s: Tensor, feat_t: Tensor) -> None:
    if not (torch.is_tensor(feat_s) and torch.is_tensor(feat_t)):
        raise TypeError(f'KRNet expects tensors, got {type(feat_s).__name__} and {type(feat_t).__name__}.')
    if feat_s.dim() != 4 or feat_t.dim() != 4:
        raise ValueError(f'KRNet expects 4-D features B x C x H x W, got student {tuple(feat_s.shape)} and '
                         f'teacher {tuple(feat_t.shape)}.')
    if feat_s.shape[0] != feat_t.shape[0]:
        raise ValueError(f'KRNet: batch sizes differ: student {feat_s.shape[0]}, teacher {feat_t.shape[0]}.')
    if feat_s.shape[1] != kr.s_channels:
        raise ValueError(f'KRNet: student feature has {feat_s.shape[1]} channels, this KRNet was built with '
                         f's_channels={kr.s_channels}.')
    if feat_t.shape[1] != kr.t_channels:
        raise ValueError(f'KRNet: teacher feature has {feat_t.shape[1]} channels, this KRNet was built with '
                         f't_channels={kr.t_channels}.')


class KRNet(nn.Module):
    r"""Knowledge representation network for one teacher/student distillation point.

    Reconstructed from the abstract of Zhu, Liu, Chen, *Learning Knowledge Representation with
    Meta Knowledge Distillation for Single Image Super-Resolution*, arXiv 2207.08356: the KRNet
    turns intermediate features into transferred knowledge "employing the student features and
    the correlation between teacher and student"; it generates texture-aware dynamic kernels
    that extract the student's texture features to be improved and the corresponding teacher
    guidance (texture-wise supervision), and weights them per texture. Everything beyond that
    is our reconstruction (design note docs/METAKD.md, "KRNet").

    Computation (``F_s``: B x Cs x H x W, ``F_t``: B x Ct x H' x W')::

        P_s = norm(A_s F_s),  P_t = norm(resize_HxW(A_t F_t))             A_*: 1x1 conv, no bias
        corr_d(x) = < P_s(x)/|P_s(x)|, P_t(x+d)/|P_t(x+d)| >,  d in {-r..r}^2   ((2r+1)^2 maps)
        h = GAP(LReLU(conv3x3(LReLU(conv3x3([P_s, corr])))))
        w_n = Z(Linear_w(h)_n)   (N kernels of k x k taps),   a = softmax(Linear_a(h))   (N)
        T_s^n = w_n * P_s,  T_t^n = w_n * P_t   (depthwise, the same kernel on both sides)

    with ``Z(w) = (w - mean(w)) / sqrt(||w - mean(w)||^2 + eps)``: kernels are zero-mean
    (high-pass: they see texture, not flat colour) and unit-norm over their taps, so they can
    neither vanish nor grow. ``*`` is cross-correlation (``F.conv2d``) with replicate padding,
    so a constant map has exactly zero texture, borders included. Per-pixel mode replaces
    ``GAP + Linear_w`` by a 1x1 conv head giving a kernel at every pixel (``a`` stays
    per-sample). Static mode (``dynamic=False``, an ablation) learns N kernels and N weight
    logits directly, the same for every sample; no generator or correlation is built.

    Normalisation (collapse) and initialisation: see the module docstring.

    Args:
        s_channels: student feature channels ``Cs``.
        t_channels: teacher feature channels ``Ct``.
        width: common width ``C`` of ``P_s, P_t``. Default ``min(64, s_channels)``.
        num_kernels: number of textures ``N``. Default 8.
        kernel_size: odd kernel size ``k >= 3``. Default 3.
        corr_radius: correlation window radius ``r`` ((2r+1)^2 maps). Default 1.
        use_correlation: feed the correlation volume to the generator. Default True.
        dynamic: generate kernels from the input; False = static learned kernels. Default True.
        per_pixel: one kernel per pixel instead of per sample. Default False.
        hidden: generator width. Default 64.
        normalize: ``'rms'`` (default), ``'pixel'`` or ``'none'``; ``True``/``False`` mean
            ``'rms'``/``'none'``. See above.
        fitnet_branch: add FitNet's representation beside the textures: a learned 1x1
            regressor ``R`` (``Cs -> Ct``, with bias, as :class:`~krdistill.losses.kd_loss.FitNetLoss`)
            and the raw teacher feature, compared by ``TextureWiseLoss`` as
            ``b_fit * mean|R(F_s) - F_t|``; the texture weights are scaled by ``b_tex``. Both branch
            weights are learned (clamped at 0 by a straight-through clamp: the value is
            ``max(b, 0)``, the gradient that of ``b``, so a weight pushed below 0 by one noisy meta
            step still gets the meta gradient and can come back) and start at ``b_fit = 1``, ``b_tex = texture_init``
            (default 0), so the family contains FitNet and, at initialisation, *is* FitNet: the meta
            objective has to earn every bit of texture supervision on top of it. ``R`` is a regressor
            and is trained on the student objective (like FitNet's). Default True (the recommended
            method); ``False`` gives the texture representation alone, its weights summing to 1.
        texture_init: initial ``b_tex`` with ``fitnet_branch``. Default 0.
        learn_fitnet_weight: with ``fitnet_branch``, whether ``b_fit`` is learned or kept at 1
            (default False: a fixed hand-crafted prior, a frozen parameter still in the state dict). No meta objective we measured credits FitNet although it helps over a run
            (BENCHMARKS.md, credit table), so the recommended settings keep it at 1 and meta-learn
            the texture branch.

    Shape:
        - feat_s: ``B x Cs x H x W`` (student feature, with gradient).
        - feat_t: ``B x Ct x H' x W'`` (teacher feature, detached by the caller); resized
          bilinearly to ``H x W`` when the sizes differ.
        - returns a dict: ``tex_s``, ``tex_t``: ``B x N x C x H x W``; ``weights``: ``B x N``
          (sums to 1, or to ``b_tex`` with a FitNet branch); ``kernels``: ``B x N x k x k`` (per-sample
          and static) or ``B x N x k*k x H x W`` (per-pixel).

    Example:
        >>> kr = KRNet(s_channels=32, t_channels=64)
        >>> out = kr(torch.randn(2, 32, 24, 24), torch.randn(2, 64, 24, 24))
        >>> out['tex_s'].shape, out['weights'].shape
        (torch.Size([2, 8, 32, 24, 24]), torch.Size([2, 8]))
    """

    def __init__(self,
                 s_channels: int,
                 t_channels: int,
                 width: int | None = None,
                 num_kernels: int = 8,
                 kernel_size: int = 3,
                 corr_radius: int = 1,
                 use_correlation: bool = True,
                 dynamic: bool = True,
                 per_pixel: bool = False,
                 hidden: int = 64,
                 normalize: str | bool = 'rms',
                 eps: float = 1e-6,
                 fitnet_branch: bool = True,
                 texture_init: float = 0.0,
                 learn_fitnet_weight: bool = False) -> None:
        super().__init__()
        if isinstance(normalize, bool):
            normalize = 'rms' if normalize else 'none'
        _check_options(s_channels=s_channels, t_channels=t_channels, width=width, num_kernels=num_kernels,
                       kernel_size=kernel_size, corr_radius=corr_radius, hidden=hidden, normalize=normalize,
                       dynamic=dynamic, per_pixel=per_pixel, texture_init=texture_init)

        self.s_channels = int(s_channels)
        self.t_channels = int(t_channels)
        self.width = int(width) if width is not None else min(64, self.s_channels)
        self.num_kernels = int(num_kernels)
        self.kernel_size = int(kernel_size)
        self.corr_radius = int(corr_radius)
        self.use_correlation = bool(use_correlation) and dynamic
        self.dynamic = bool(dynamic)
        self.per_pixel = bool(per_pixel)
        self.hidden = int(hidden)
        self.normalize = normalize
        self.eps = float(eps)

        c, n, taps = self.width, self.num_kernels, self.kernel_size**2
        self.fitnet_branch = bool(fitnet_branch)
        if self.fitnet_branch:  # drawn first: from the same RNG state it is FitNetLoss's regressor, value for value
            self.regressor = nn.Conv2d(self.s_channels, self.t_channels, 1)
        # No bias: a constant adapter output would pass normalisation as a texture-free map.
        self.adapter_s = nn.Conv2d(self.s_channels, c, 1, bias=False)
        self.adapter_t = nn.Conv2d(self.t_channels, c, 1, bias=False)

        bank = _highpass_bank(n, taps)
        if self.dynamic:
            self.gen_in_channels = c + (self.num_corr if self.use_correlation else 0)
            self.generator = nn.Sequential(
                nn.Conv2d(self.gen_in_channels, self.hidden, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(self.hidden, self.hidden, 3, padding=1), nn.LeakyReLU(0.2, inplace=True))
            if self.per_pixel:
                self.kernel_head = nn.Conv2d(self.hidden, n * taps, 1)
            else:
                self.kernel_head = nn.Linear(self.hidden, n * taps)
            self.weight_head = nn.Linear(self.hidden, n)
            with torch.no_grad():
                self.kernel_head.weight.mul_(0.1)
                self.kernel_head.bias.copy_(bank.reshape(-1))
                self.weight_head.weight.mul_(0.1)
                self.weight_head.bias.zero_()
        else:
            self.gen_in_channels = 0
            self.kernel_bank = nn.Parameter(bank)  # N x k*k
            self.weight_logits = nn.Parameter(torch.zeros(n))
        if self.fitnet_branch:
            self.fitnet_weight = nn.Parameter(torch.ones(()))
            self.texture_weight = nn.Parameter(torch.full((), float(texture_init)))
            self.fitnet_weight.requires_grad_(bool(learn_fitnet_weight))

    @property
    def num_corr(self) -> int:
        """Number of correlation maps, ``(2r+1)^2``."""
        return (2 * self.corr_radius + 1)**2

    def extra_repr(self) -> str:
        return (f's_channels={self.s_channels}, t_channels={self.t_channels}, width={self.width}, '
                f'num_kernels={self.num_kernels}, kernel_size={self.kernel_size}, corr_radius={self.corr_radius}, '
                f'use_correlation={self.use_correlation}, dynamic={self.dynamic}, per_pixel={self.per_pixel}, '
                f'hidden={self.hidden}, normalize={self.normalize!r}, eps={self.eps:g}, '
                f'fitnet_branch={self.fitnet_branch}' +
                (f', learn_fitnet_weight={self.fitnet_weight.requires_grad}' if self.fitnet_branch else ''))

    def branch_weights(self) -> list[tuple[str, nn.Parameter]]:
        """The FitNet branch's weights, ``[('tex', b_tex), ('fit', b_fit)]`` (empty without the branch)."""
        return [('tex', self.texture_weight), ('fit', self.fitnet_weight)] if self.fitnet_branch else []

    def student_trained_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on the student objective, not the meta objective: the FitNet branch's
        regressor (a regressor, trained like FitNet's)."""
        return list(self.regressor.parameters()) if self.fitnet_branch else []

    # ----------------------------------------------------------------------------------------
    def _norm(self, p: Tensor) -> Tensor:
        if self.normalize == 'rms':
            p = p - p.mean(dim=(2, 3), keepdim=True)
            return p * torch.rsqrt(p.pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        if self.normalize == 'pixel':
            return p * torch.rsqrt(p.pow(2).sum(dim=1, keepdim=True) + self.eps)
        return p

    def correlation(self, p_s: Tensor, p_t: Tensor) -> Tensor:
        """Local correlation volume ``B x (2r+1)^2 x H x W`` of cosine similarities.

        Map ``i = (dy + r) * (2r+1) + (dx + r)`` holds ``<p_s(y, x), p_t(y+dy, x+dx)>`` of the
        L2-normalised channel vectors; displacements outside the map give 0.
        """
        r = self.corr_radius
        h, w = p_s.shape[-2:]
        p_s = p_s * torch.rsqrt(p_s.pow(2).sum(dim=1, keepdim=True) + self.eps)
        p_t = p_t * torch.rsqrt(p_t.pow(2).sum(dim=1, keepdim=True) + self.eps)
        p_t = F.pad(p_t, (r, r, r, r))
        # A loop over shifts holds one C x H x W product at a time (unfold would hold (2r+1)^2).
        maps = [(p_s * p_t[:, :, dy:dy + h, dx:dx + w]).sum(dim=1) for dy in range(2 * r + 1)
                for dx in range(2 * r + 1)]
        return torch.stack(maps, dim=1)

    def forward(self, feat_s: Tensor, feat_t: Tensor, texture: str = 'weighted') -> dict[str, Tensor]:
        """Texture features of student and teacher, their weights and the kernels (see class doc).

        ``texture`` (what the FitNet branch's ``b_tex`` does; no effect without the branch):
        ``'weighted'`` (default) scales the texture weights by ``b_tex``; ``'unit'`` evaluates them at
        ``b_tex = 1`` keeping the gradient to ``b_tex`` (the kernels' one-step meta gradient while the
        horizon objective decides ``b_tex``); ``'skip_zero'`` leaves the texture maps out
        (``tex_s = tex_t = None``) while ``b_tex = 0``: the texture term is then exactly 0 and the
        maps are most of a KRNet's cost.
        """
        if texture not in _TEXTURE:
            raise ValueError(f'KRNet: texture must be one of {_TEXTURE}, got {texture!r}.')
        _check_features(self, feat_s, feat_t)
        b, _, h, w = feat_s.shape
        n, k = self.num_kernels, self.kernel_size
        taps, pad = k * k, k // 2

        p_s = self.adapter_s(feat_s)
        p_t = self.adapter_t(feat_t)
        if p_t.shape[-2:] != (h, w):  # 1x1 conv without bias commutes with resizing: resize the thinner map
            p_t = F.interpolate(p_t, size=(h, w), mode='bilinear', align_corners=False)
        p_s, p_t = self._norm(p_s), self._norm(p_t)

        if self.dynamic:
            gen_in = torch.cat([p_s, self.correlation(p_s, p_t)], dim=1) if self.use_correlation else p_s
            feat = self.generator(gen_in)
            pooled = feat.mean(dim=(2, 3))
            weights = torch.softmax(self.weight_head(pooled), dim=1)
            if self.per_pixel:
                raw = self.kernel_head(feat).view(b, n, taps, h, w)
                kernels = _normalize_taps(raw, dim=2, eps=self.eps)
            else:
                raw = self.kernel_head(pooled).view(b, n, taps)
                kernels = _normalize_taps(raw, dim=2, eps=self.eps).view(b, n, k, k)
        else:
            kernels = _normalize_taps(self.kernel_bank, dim=1, eps=self.eps).view(1, n, k, k).expand(b, n, k, k)
            weights = torch.softmax(self.weight_logits, dim=0).unsqueeze(0).expand(b, n)
        extra = {}
        if self.fitnet_branch:
            b_tex = _nonneg(self.texture_weight)
            if texture == 'unit':  # value 1 (the gradient to b_tex is kept): see MetaKD, meta.objective: horizon
                b_tex = b_tex - b_tex.detach() + 1.0
            weights = weights * b_tex
            extra = {'fit_s': self.regressor(feat_s), 'fit_t': feat_t, 'fit_weight': _nonneg(self.fitnet_weight)}
            if texture == 'skip_zero' and not bool(self.texture_weight.detach() > 0):
                # b_tex = max(texture_weight, 0) = 0: every texture weight is 0, so the term adds exactly 0
                return {'tex_s': None, 'tex_t': None, 'weights': weights, 'kernels': kernels, **extra}

        # Student and teacher go through the same kernels in one pass: channels [P_s, P_t].
        both = F.pad(torch.cat([p_s, p_t], dim=1), (pad, pad, pad, pad), mode='replicate')
        c2 = both.shape[1]
        if self.per_pixel:
            cols = F.unfold(both, k).view(b, c2, taps, h, w)
            tex = torch.einsum('bckhw,bnkhw->bnchw', cols, kernels)
        else:
            tex = _unfold_texture(both, kernels.reshape(b, n, taps), k, h, w)
        tex_s, tex_t = tex.split(self.width, dim=2)
        return {'tex_s': tex_s, 'tex_t': tex_t, 'weights': weights, 'kernels': kernels, **extra}
