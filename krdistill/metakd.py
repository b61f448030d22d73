"""MetaKD: the one implementation of the method's objective, meta step and iteration (torch only).

Reconstructed from the abstract of Zhu, Liu, Chen, "Learning Knowledge Representation with Meta
Knowledge Distillation for Single Image Super-Resolution", arXiv 2207.08356 (our design and its
reasoning: ``docs/METAKD.md``). KRNets turn student features and the teacher-student correlation
into texture-aware dynamic kernels; the same kernels extract the student's textures and the
teacher's guidance (texture-wise loss); the KRNets are trained by a meta objective: the student's
pixel loss after a virtual step.

BasicSR's ``MetaKDModel``, the mmengine ``MMEngineMetaKDModel``, the plain-loop example and the
benchmark all run :meth:`MetaKD.train_step`; they only build it (:func:`krdistill.build.build_metakd`)
and own the optimizers::

    mkd = build_metakd(teacher, student, ['body.31'], ['body.15'], network_kr={'type': 'KRNet'},
                       texture_opt={'type': 'TextureWiseLoss'}, meta={'every': 4})
    opt = torch.optim.Adam(student.parameters(), 2e-4)
    opt_kr = build_optimizer({'type': 'Adam', 'lr': 1e-4}, mkd.kr_parameters())
    for lq, gt in loader:
        step = mkd.train_step(lq, gt, opt, opt_kr)   # meta step (every `every`), then the student step

One iteration: the teacher runs once (or its cached output is passed as ``teacher=``); on meta
iterations the meta gradient of the KRNets is computed on the meta batch (``meta_data`` if given,
else the previous training batch, else the current one) and ``optimizer_kr`` steps; then the
student objective is minimised by ``optimizer``. No step is taken on non-finite values.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .distiller import Distiller, StepResult, TeacherOutput, all_finite
from .upcycle import Upcycled, Upcycler
from .features import unwrap
from .losses.texture_loss import TextureWiseLoss
from .meta_objectives import Objective, make_objective
from .meta_options import META_DEFAULTS, MetaOptions, check_meta_options, check_number

__all__ = ['MetaKD', 'KRTextureTerm', 'META_DEFAULTS', 'MetaOptions', 'check_meta_options', 'check_number',
           'texture_stats']


class KRTextureTerm(nn.Module):
    """One distillation point: ``TextureWiseLoss(KRNet(F_s, F_t))``. Logged as ``l_texture``."""

    tag = 'texture'
    log_key = 'l_texture'

    def __init__(self, krnet: nn.Module, texture_loss: nn.Module):
        super().__init__()
        self.krnet = krnet
        self.texture_loss = texture_loss
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor, texture: str = 'weighted') -> torch.Tensor:
        out = self.krnet(feat_s, feat_t, texture=texture)
        self.stats = texture_stats(out)
        return self.texture_loss(out)


@torch.no_grad()
def texture_stats(out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a KRNet transfers, for the logs: ``texture_gain`` (the sum of the texture weights, the
    overall strength), ``texture_entropy`` (of the normalised weights, nats; log N = uniform, 0 =
    one texture), ``texture_weights`` (the N weights, batch mean; not logged) and, with a FitNet
    branch, ``fitnet_weight``."""
    w = out['weights'].detach().float()
    gain = w.sum(dim=-1, keepdim=True)
    a = (w / gain.clamp_min(1e-12)).clamp_min(1e-12)
    stats = {'texture_gain': gain.mean(), 'texture_entropy': -(a * a.log()).sum(-1).mean(),
             'texture_weights': w.reshape(-1, w.shape[-1]).mean(0)}
    if 'fit_weight' in out:
        stats['fitnet_weight'] = out['fit_weight'].detach().float()
    return stats


class MetaKD(Distiller):
    """Meta knowledge distillation (MetaKD, arXiv 2207.08356, reconstructed): student objective
    ``L_S = L_pix + lambda_tex L_tex [+ lambda_out L_out]``; the KRNets trained by the objective
    ``meta`` chooses (:mod:`krdistill.meta_objectives`), by default meta-learned on
    ``L_pix(S_theta'(x_m), y_m)`` after the step ``theta'`` the student's optimizer would take.

    Args:
        teacher, student, teacher_layers, student_layers: as :class:`~krdistill.distiller.Distiller`.
        krnets: one KRNet per distillation point (training-only; their parameters are ``phi``).
        texture_loss: a :class:`~krdistill.losses.texture_loss.TextureWiseLoss` (its
            ``loss_weight`` is lambda_tex). Default: L1, weight 1.
        pixel_loss: ``(sr, gt) -> scalar``; the student's reconstruction loss, also the meta
            objective. Default: L1.
        output_loss: optional output-KD loss added to the student objective (lambda_out).
        meta_loss: ``(sr, gt) -> scalar``, the meta objective's criterion when it is not ``pixel_loss``
            (e.g. GAN training: ``pixel_loss`` returns the generator's terms, GAN term included, while the
            meta objective keeps the reconstruction terms; see ``docs/GAN_KD.md``). Default ``pixel_loss``.
        meta: the ``meta:`` options, a :class:`~krdistill.meta_options.MetaOptions` (a mapping is
            checked by :func:`~krdistill.meta_options.check_meta_options`). ``start``: meta-learning
            starts after iteration ``start``; until then the KRNets stay as initialised, no meta step
            is taken and no horizon trace is kept (value for value ``update: frozen``).
        meta_data: optional iterable of meta batches, ``(lq, gt)`` pairs or mappings with ``lq`` /
            ``gt`` (a held-out split), cycled. Without it the meta batch is the previous training
            batch whose step was taken (the current one at the first iteration).
        phase: optional timing hook, see :attr:`~krdistill.distiller.Distiller.phase`.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_layers: Sequence[str],
                 student_layers: Sequence[str], krnets: Sequence[nn.Module], texture_loss: nn.Module | None = None,
                 pixel_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 output_loss: nn.Module | None = None, meta: MetaOptions | Mapping | None = None,
                 meta_data: Iterable | None = None, keys: Mapping[str, str] | None = None,
                 upcycle: Upcycler | None = None, meta_loss: Callable | None = None):
        texture_loss = texture_loss if texture_loss is not None else TextureWiseLoss()
        if not student_layers:
            raise ValueError('MetaKD needs at least one (teacher_module, student_module) distillation point')
        if len(krnets) != len(student_layers):
            raise ValueError(f'{len(krnets)} KRNets for {len(student_layers)} distillation points')
        terms = [KRTextureTerm(kr, texture_loss) for kr in krnets]
        super().__init__(teacher, student, teacher_layers, student_layers, pair_losses=terms,
                         output_loss=output_loss, pixel_loss=pixel_loss if pixel_loss is not None else nn.L1Loss(),
                         keys=keys, upcycle=upcycle)
        if upcycle is not None and upcycle.options.steps != 1:
            raise ValueError(f'{upcycle.key}.steps: MetaKD takes one student step per iteration (its meta '
                             f'objectives follow that step); use steps: 1')
        self.krnets = nn.ModuleList(krnets)
        object.__setattr__(self, '_meta_loss', meta_loss)  # not a sub-module: it may be a bound method
        self.meta = check_meta_options(meta)
        #: what trains the KRNets (chosen once, here)
        self.objective: Objective = make_objective(self, self.meta)
        self._started = self.meta.start == 0  # meta-learning has started (iteration > meta.start)
        self.set_meta_data(meta_data)
        self._calls = 0          # train_step calls: the iteration when no `it` is given
        self._last_batch = None  # (lq, gt) of the last iteration whose steps were all taken

    def meta_criterion(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """The meta objective's criterion ``L_meta(sr, gt)``: ``meta_loss`` if given, else ``pixel_loss``."""
        return (self._meta_loss if self._meta_loss is not None else self.pixel_loss)(sr, gt)

    # ------------------------------------------------------------------ parameters
    def kr_parameters(self) -> list[nn.Parameter]:
        """Every trainable KRNet parameter (what ``optimizer_kr`` holds)."""
        return [p for p in self.krnets.parameters() if p.requires_grad]

    def kd_parameters(self) -> list[nn.Parameter]:
        return []  # the KRNets have their own optimizer

    def trained_kd_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters the student objective trains (FitNet regressors; all with ``update: joint``)."""
        return self.objective.student_trained()

    def meta_kr_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters the meta objective trains."""
        return self.objective.meta_parameters()

    def branch_weights(self) -> list[tuple[str, nn.Parameter]]:
        """``(log name, parameter)`` of the FitNet branches' learned weights (``kr<i>_b_tex``, ``kr<i>_b_fit``)."""
        return [(f'kr{i}_b_{tag}', p) for i, kr in enumerate(self.krnets) for tag, p in kr.branch_weights()
                if p.requires_grad]

    # ------------------------------------------------------------------ meta batches
    def set_meta_data(self, meta_data: Iterable | None) -> None:
        """Draw meta batches from ``meta_data`` (cycled), or from the previous batch when None."""
        self._meta_iter = None if meta_data is None else \
            iter(itertools.chain.from_iterable(itertools.repeat(meta_data)))

    def has_meta_data(self) -> bool:
        return self._meta_iter is not None

    def meta_batch(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta batch for the current ``(lq, gt)``: from ``meta_data`` if set, else the previous
        training batch, else (first iteration) the current one."""
        if self._meta_iter is not None:
            data = next(self._meta_iter)
            lq_m, gt_m = (data['lq'], data['gt']) if isinstance(data, Mapping) else data[:2]
            return lq_m.to(lq.device), gt_m.to(gt.device)
        if self._last_batch is not None:
            return self._last_batch
        return lq, gt

    def is_meta_iter(self, it: int) -> bool:
        """Whether iteration ``it`` (1-based) runs a meta step."""
        return self.objective.meta_learns and it > self.meta.start and it % self.meta.every == 0

    # ------------------------------------------------------------------ student-step hooks
    def _before_backward(self, total: torch.Tensor):
        return self.objective.before_backward(total) if self._started else None

    def _after_step(self, optimizer, pending) -> None:
        self.objective.after_step(optimizer, pending)

    # ------------------------------------------------------------------ the iteration
    def train_step(self, lq: torch.Tensor, gt: torch.Tensor, optimizer, optimizer_kr=None, *,
                   teacher: TeacherOutput | None = None, it: int | None = None,
                   upcycled: Upcycled | None = None) -> StepResult:
        """One MetaKD iteration: the meta step on meta iterations, then the student step.

        Args:
            optimizer: the student's optimizer (or an mmengine ``OptimWrapper``); the virtual step
                is the step it would take (Adam, AdamW or SGD).
            optimizer_kr: the KRNets' optimizer; needed unless no KRNet parameter is trained.
            teacher: ``(out_t, feats_t)`` of this batch, e.g. from a cache; default one teacher forward.
            it: the 1-based iteration (the meta schedule); default the number of calls so far.
            upcycled: with upcycling, this batch's upcycled data (e.g. cached); default
                :meth:`~krdistill.distiller.Distiller.upcycled`. Its terms are in the student
                objective and in the virtual step.

        Returns:
            :class:`~krdistill.distiller.StepResult`: ``logs`` (``l_total``, ``l_pix``,
            ``l_texture`` [, ``l_kd_out``] [, ``l_meta``, ``meta_grad_norm``, ``t_meta``]
            [, ``l_meta_horizon``, ``kr<i>_b_tex_credit``]) and ``skipped`` (why a step was not
            taken, or None).
        """
        self._calls += 1
        it = self._calls if it is None else int(it)
        if optimizer_kr is None and (self.meta_kr_parameters() or self.trained_kd_parameters()):
            raise ValueError('MetaKD.train_step: optimizer_kr is needed to train the KRNets')
        teacher = teacher if teacher is not None else self.teacher_forward(lq)
        if self.upcycle is not None and upcycled is None:
            upcycled = self.upcycled(lq, gt)
        self._started = it > self.meta.start
        info: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        skipped = None
        if self.is_meta_iter(it):
            optimizer_kr.zero_grad(set_to_none=True)
            logs, checked = self.objective.meta_step(lq, gt, teacher, optimizer, upcycled)
            info.update(logs)
            if all_finite(checked):
                optimizer_kr.step()
                with torch.no_grad():  # projected step: a branch weight below 0 would be a silent 0 that
                    for _, p in self.branch_weights():  # has to climb back; keep it at 0, ready to rise
                        p.clamp_(min=0)
            else:
                skipped = 'non-finite meta loss or KRNet meta gradients'
            optimizer_kr.zero_grad(set_to_none=True)
        joint = optimizer_kr if self.trained_kd_parameters() else None
        texture = self.objective.student_texture(self._started)
        step = self.student_step(lq, gt, optimizer, teacher, extra_optimizer=joint, point_kwargs={'texture': texture},
                                 upcycled=upcycled)
        step.logs.update(info)
        for i, term in enumerate(self.pair_losses):  # what each KRNet transferred in the student step
            step.logs.update((f'kr{i}_{k}', v) for k, v in term.stats.items() if v.dim() == 0)
        step.skipped = '; '.join(s for s in (skipped, step.skipped) if s) or None
        if step.skipped is None:  # a bad batch is never the next meta batch
            self._last_batch = (lq.detach(), gt.detach())
        return step

    # ------------------------------------------------------------------ checkpoints
    def meta_state_dict(self, keep_batch: bool = True) -> dict:
        """The meta fallback state: the call counter, (``keep_batch``) the last batch seen and the
        objective's state (the horizon traces)."""
        state: dict[str, Any] = {'calls': self._calls}
        if keep_batch and self._last_batch is not None:
            state['last_batch'] = [t.detach().cpu().clone() for t in self._last_batch]
        state.update(self.objective.state_dict())
        return state

    def load_meta_state_dict(self, state: Mapping) -> None:
        self._calls = int(state.get('calls', 0))
        device = next(iter(unwrap(self.student).parameters())).device
        batch = state.get('last_batch')
        self._last_batch = tuple(t.to(device) for t in batch) if batch is not None else None
        self.objective.load_state_dict(state, device)

    def training_state_dict(self) -> dict:
        """``{'krnets', 'meta_state'}``: the KRNets and the meta fallback state (tensors, numbers
        only: loads with ``torch.load(..., weights_only=True)``). Save the optimizers beside it."""
        return {'krnets': self.krnets.state_dict(), 'meta_state': self.meta_state_dict()}

    def load_training_state_dict(self, state: Mapping, strict: bool = True) -> None:
        missing = [k for k in ('krnets', 'meta_state') if k not in state]
        if strict and missing:
            raise KeyError(f'MetaKD.load_training_state_dict: missing {missing} (has {sorted(state)})')
        if 'krnets' in state:
            self.krnets.load_state_dict(state['krnets'], strict=strict)
        if 'meta_state' in state:
            self.load_meta_state_dict(state['meta_state'])
