"""MetaKD for any PyTorch SR training loop (torch only; BasicSR's ``MetaKDModel`` is a thin user).

Building it from option blocks (KRNets from ``network_kr``, losses, ``optim_kr``) and the
per-iteration bookkeeping (meta batch, checkpoints) are done by :class:`krdistill.api.MetaKD`.

Reconstructed from the abstract of Zhu, Liu, Chen, arXiv 2207.08356: KRNets turn student
features and the teacher-student correlation into texture-aware dynamic kernels; the same
kernels extract the student's textures and the teacher's guidance (texture-wise loss); the
KRNets are trained by a meta objective: the student's pixel loss after a virtual step.

One iteration (``update='meta'``)::

    out_t, feats_t = mkd.teacher_forward(lq)                    # once, no graph
    if mkd.is_meta_iter(it):
        mkd.meta_step(lq, gt, lq_m, gt_m, out_t, feats_t, student_optimizer=opt_s)  # alpha: opt_s's lr
        opt_kr.step()                                           # KRNet grads were set by meta_step
    opt_s.zero_grad()
    loss, terms, out = mkd.objective(lq, gt, out_t, feats_t)
    mkd.backward(loss)                                          # into the student only (update='meta')
    opt_s.step()
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .distiller import Distiller
from .features import unwrap
from .losses.texture_loss import TextureWiseLoss
from .meta import adam_preconditioner, meta_gradient

__all__ = ['KRTextureTerm', 'MetaDistiller', 'META_DEFAULTS']

#: the ``meta:`` block of an option file, with the design's defaults
META_DEFAULTS = dict(every=1, mode='exact', inner_lr=None, precond='none', update='meta', fd_eps=0.01, adapters='meta')
_CHOICES = dict(mode=('exact', 'finite_difference'), precond=('none', 'adam'), update=('meta', 'joint', 'frozen'),
                adapters=('meta', 'joint', 'student'))


def check_meta_options(meta: dict | None, key: str = 'meta') -> dict:
    """Fill defaults and validate a ``meta:`` block; errors name ``meta.<key>``."""
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f'{key}: must be a mapping of {sorted(META_DEFAULTS)}, got {type(meta).__name__}')
    meta = dict(meta or {})
    unknown = sorted(set(meta) - set(META_DEFAULTS))
    if unknown:
        raise KeyError(f'{key}: unknown key(s) {unknown}; allowed: {sorted(META_DEFAULTS)}')
    out = dict(META_DEFAULTS, **meta)
    for k, choices in _CHOICES.items():
        if out[k] not in choices:
            raise ValueError(f'{key}.{k}: must be one of {list(choices)}, got {out[k]!r}')
    if not isinstance(out['every'], int) or isinstance(out['every'], bool) or out['every'] < 1:
        raise ValueError(f'{key}.every: must be an integer >= 1, got {out["every"]!r}')
    if out['inner_lr'] is not None and (not isinstance(out['inner_lr'], (int, float)) or out['inner_lr'] <= 0):
        raise ValueError(f'{key}.inner_lr: must be null (the student\'s current lr) or a number > 0, '
                         f'got {out["inner_lr"]!r}')
    if not isinstance(out['fd_eps'], (int, float)) or out['fd_eps'] <= 0:
        raise ValueError(f'{key}.fd_eps: must be a number > 0, got {out["fd_eps"]!r}')
    return out


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _average_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Differentiable mean over ranks (the virtual step then uses the global-batch gradient)."""
    from torch.distributed.nn.functional import all_reduce
    world = torch.distributed.get_world_size()
    return [all_reduce(t.contiguous()) / world for t in tensors]


class KRTextureTerm(nn.Module):
    """One distillation point: ``TextureWiseLoss(KRNet(F_s, F_t))``. Logged as ``l_texture``."""

    tag = 'texture'
    log_key = 'l_texture'

    def __init__(self, krnet: nn.Module, texture_loss: nn.Module):
        super().__init__()
        self.krnet = krnet
        self.texture_loss = texture_loss

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return self.texture_loss(self.krnet(feat_s, feat_t))


class MetaDistiller(Distiller):
    """Teacher, student, KRNets, texture-wise loss and the meta update in one object.

    Args:
        teacher, student, teacher_layers, student_layers: as :class:`~krdistill.distiller.Distiller`.
        krnets: one KRNet per distillation point (training-only; their parameters are ``phi``).
        texture_loss: a :class:`~krdistill.losses.texture_loss.TextureWiseLoss` (its
            ``loss_weight`` is lambda_tex). Default: L1, weight 1.
        pixel_loss: ``(sr, gt) -> scalar``; the student's reconstruction loss, also the meta
            objective. Default: L1.
        output_loss: optional output-KD loss added to the student objective (lambda_out).
        meta: the ``meta:`` options (:data:`META_DEFAULTS`): ``every``, ``mode``
            (exact | finite_difference), ``inner_lr`` (None: the student's current lr),
            ``precond`` (none | adam), ``update`` (meta | joint | frozen), ``fd_eps``,
            ``adapters`` (meta | joint | student): how the KRNets' 1x1 alignment convs
            (``adapter_s``, ``adapter_t``) are trained. ``meta`` (default): like the rest of the
            KRNet. ``joint``: both minimise the student objective at every iteration, like a FitNet
            regressor (alignment is regression; the texture representation, i.e. kernels and
            weights, stays meta-learned; KRNet's normalisation keeps them from collapsing to 0).
            ``student``: only ``adapter_s`` does. They are stepped by the KRNets' optimizer.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_layers: Sequence[str],
                 student_layers: Sequence[str], krnets: Sequence[nn.Module],
                 texture_loss: nn.Module | None = None,
                 pixel_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 output_loss: nn.Module | None = None, meta: dict | None = None, keys: dict | None = None):
        texture_loss = texture_loss if texture_loss is not None else TextureWiseLoss()
        if len(krnets) != len(student_layers):
            raise ValueError(f'{len(krnets)} KRNets for {len(student_layers)} distillation points')
        terms = [KRTextureTerm(kr, texture_loss) for kr in krnets]
        super().__init__(teacher, student, teacher_layers, student_layers, pair_losses=terms,
                         output_loss=output_loss, keys=keys)
        self.krnets = nn.ModuleList(krnets)
        self.pixel_loss = pixel_loss if pixel_loss is not None else nn.L1Loss()
        self.meta = check_meta_options(meta)

    # ------------------------------------------------------------------ objective
    def kr_parameters(self) -> list[nn.Parameter]:
        """Every trainable KRNet parameter (what ``optimizer_kr`` holds)."""
        return [p for p in self.krnets.parameters() if p.requires_grad]

    def joint_kr_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters trained on the student objective at every iteration: all of them with
        ``update='joint'``, else the adapters chosen by ``adapters``."""
        if self.meta['update'] == 'joint':
            return self.kr_parameters()
        names = {'meta': (), 'joint': ('adapter_s', 'adapter_t'), 'student': ('adapter_s', )}[self.meta['adapters']]
        params = []
        for kr in self.krnets:
            for name in names:
                mod = getattr(kr, name, None)
                if mod is None:
                    raise AttributeError(f'meta.adapters: {self.meta["adapters"]!r} needs a KRNet with a '
                                         f'{name!r} module; {type(kr).__name__} has none')
                params += [p for p in mod.parameters() if p.requires_grad]
        return params

    def meta_kr_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters trained by the meta objective (none with ``update='joint'``)."""
        joint = {id(p) for p in self.joint_kr_parameters()}
        return [p for p in self.kr_parameters() if id(p) not in joint]

    def objective(self, lq: torch.Tensor, gt: torch.Tensor, out_t: torch.Tensor | None = None,
                  feats_t: Sequence[torch.Tensor] | None = None, params: dict | None = None):
        """Student objective ``L_S = L_pix + lambda_tex * L_tex [+ lambda_out * L_out]``.

        Returns ``(total, terms, sr)``; ``terms`` holds ``l_pix``, ``l_texture`` (and
        ``l_kd_out``) for logging. ``params``: evaluate the student with these parameters.
        """
        if out_t is None or feats_t is None:
            out_t, feats_t = self.teacher_forward(lq)
        sr, feats_s = self.student_forward(lq, params)
        terms = OrderedDict(l_pix=self.pixel_loss(sr, gt))
        terms.update(self.kd_terms(sr, feats_s, out_t, feats_t))
        return torch.stack(list(terms.values())).sum(), terms, sr

    def kd_terms(self, out_s, feats_s, out_t, feats_t):
        terms = super().kd_terms(out_s, feats_s, out_t, feats_t)
        if 'l_kd_texture' in terms:  # the design's log key
            terms = OrderedDict((KRTextureTerm.log_key if k == 'l_kd_texture' else k, v) for k, v in terms.items())
        return terms

    def grad_inputs(self) -> list[torch.Tensor]:
        """The tensors the student objective is differentiated for: the student's trainable
        parameters, plus :meth:`joint_kr_parameters`."""
        return [p for p in unwrap(self.student).parameters() if p.requires_grad] + self.joint_kr_parameters()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the student objective into :meth:`grad_inputs`: the student and the
        :meth:`joint_kr_parameters` (none with the defaults)."""
        loss.backward(inputs=self.grad_inputs())

    # ------------------------------------------------------------------ meta step
    def is_meta_iter(self, it: int) -> bool:
        """Whether iteration ``it`` (1-based) runs a meta step."""
        return self.meta['update'] == 'meta' and it % self.meta['every'] == 0

    def inner_lr(self, student_optimizer: torch.optim.Optimizer | None) -> float:
        if self.meta['inner_lr'] is not None:
            return float(self.meta['inner_lr'])
        if student_optimizer is None:
            raise ValueError('meta.inner_lr is null (use the student\'s lr) but no student optimizer was given')
        return float(student_optimizer.param_groups[0]['lr'])

    def meta_step(self, lq: torch.Tensor, gt: torch.Tensor, lq_meta: torch.Tensor, gt_meta: torch.Tensor,
                  out_t: torch.Tensor | None = None, feats_t: Sequence[torch.Tensor] | None = None,
                  student_optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Set ``.grad`` of the KRNet parameters to ``d L_meta(theta'(phi)) / d phi``.

        ``theta' = theta - alpha * grad_theta L_S(theta, phi)`` on ``(lq, gt)``;
        ``L_meta = L_pix(S_theta'(lq_meta), gt_meta)``. The student is not changed. Under
        ``torch.distributed`` the KRNet gradients are averaged over ranks. The caller steps the
        KRNet optimizer. Returns detached scalars ``l_meta``, ``meta_grad_norm``, ``t_meta``.
        """
        t0 = time.perf_counter()
        if out_t is None or feats_t is None:
            out_t, feats_t = self.teacher_forward(lq)
        bare = unwrap(self.student)
        precond = None
        if self.meta['precond'] == 'adam':
            if student_optimizer is None:
                raise ValueError('meta.precond: adam needs the student optimizer')
            precond = adam_preconditioner(student_optimizer, bare.named_parameters())
        kr_params = self.meta_kr_parameters()

        def student_loss(params):
            return self.objective(lq, gt, out_t, feats_t, params)[0]

        def meta_loss(params):
            return self.pixel_loss(functional_call(bare, params, (lq_meta,)), gt_meta)

        world = _world_size()
        grads, info = meta_gradient(self.student, student_loss, meta_loss, kr_params, lr=self.inner_lr(
            student_optimizer), mode=self.meta['mode'], precond=precond, fd_eps=self.meta['fd_eps'],
            reduce=_average_over_ranks if world > 1 else None)
        if world > 1:  # the meta gradient of the global batch: average over ranks
            for g in grads:
                torch.distributed.all_reduce(g)
                g.div_(world)
        for p, g in zip(kr_params, grads):
            p.grad = g
        return dict(l_meta=info['l_meta'], meta_grad_norm=info['grad_norm'],
                    t_meta=torch.tensor(time.perf_counter() - t0))
