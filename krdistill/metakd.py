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
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .distiller import (Distiller, StepResult, TeacherOutput, all_finite, average_over_ranks, unwrap_optimizer,
                        world_size)
from .features import unwrap
from .losses.texture_loss import TextureWiseLoss
from .meta import HorizonTrace, adam_preconditioner, meta_gradient, optimizer_step

__all__ = ['MetaKD', 'KRTextureTerm', 'META_DEFAULTS', 'check_meta_options', 'check_number', 'texture_stats']

#: the ``meta:`` block of an option file, with the design's defaults (``dataset``: BasicSR only)
META_DEFAULTS = dict(every=1, mode='exact', inner_lr=None, precond='none', update='meta', fd_eps=1e-3,
                     adapters='meta', virtual_step='plain', teacher_weight=0.0, objective='one_step',
                     horizon_decay=0.99, horizon_stride=1, horizon_terms='all', start=0)
_CHOICES = dict(mode=('exact', 'finite_difference'), precond=('none', 'adam'), update=('meta', 'joint', 'frozen'),
                adapters=('meta', 'joint', 'student'), virtual_step=('plain', 'optimizer'),
                objective=('one_step', 'horizon'), horizon_terms=('all', 'one'))


def _number_error(key: str, value: Any, what: str) -> ValueError:
    hint = ''
    if isinstance(value, str):
        hint = (f' (it was read as the string {value!r}: YAML 1.1 reads 1e-4 as a string; write it with a dot '
                'and a sign, e.g. 1.0e-4)')
    return ValueError(f'{key}: must be {what}, got {value!r}{hint}')


def check_number(value: Any, key: str, *, minimum: float | None = None, exclusive: bool = False,
                 integer: bool = False) -> float | int:
    """Validate one numeric option; the error names ``key`` (and explains YAML's ``1e-4`` string)."""
    ok_type = (int, ) if integer else (int, float)
    what = 'an integer' if integer else 'a number'
    if minimum is not None:
        what += f' {">" if exclusive else ">="} {minimum:g}'
    if isinstance(value, bool) or not isinstance(value, ok_type) or value != value:  # NaN != NaN
        raise _number_error(key, value, what)
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        raise _number_error(key, value, what)
    return value


def check_meta_options(meta: Mapping | None, key: str = 'meta', extra_keys: Sequence[str] = ()) -> dict:
    """Fill defaults and validate a ``meta:`` block; errors name ``meta.<key>``."""
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f'{key}: must be a mapping of {sorted(META_DEFAULTS)}, got {type(meta).__name__}')
    meta = dict(meta or {})
    allowed = set(META_DEFAULTS) | set(extra_keys)
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise KeyError(f'{key}: unknown key(s) {unknown}; allowed: {sorted(allowed)}')
    out = dict(META_DEFAULTS, **meta)
    for k, choices in _CHOICES.items():
        if out[k] not in choices:
            raise ValueError(f'{key}.{k}: must be one of {list(choices)}, got {out[k]!r}')
    check_number(out['every'], f'{key}.every', minimum=1, integer=True)
    if out['inner_lr'] is not None:
        check_number(out['inner_lr'], f'{key}.inner_lr (null: the student\'s current lr)', minimum=0, exclusive=True)
    check_number(out['fd_eps'], f'{key}.fd_eps', minimum=0, exclusive=True)
    check_number(out['teacher_weight'], f'{key}.teacher_weight', minimum=0)
    check_number(out['horizon_decay'], f'{key}.horizon_decay', minimum=0)
    check_number(out['horizon_stride'], f'{key}.horizon_stride', minimum=1, integer=True)
    check_number(out['start'], f'{key}.start (the last iteration before meta-learning starts)', minimum=0,
                 integer=True)
    if out['horizon_decay'] > 1:
        raise ValueError(f'{key}.horizon_decay: must be in [0, 1] (1 / (1 - decay) steps of memory), '
                         f'got {out["horizon_decay"]!r}')
    if out['virtual_step'] == 'optimizer' and (out['precond'] != 'none' or out['inner_lr'] is not None):
        raise ValueError(f'{key}.virtual_step: optimizer takes the student optimizer\'s own step (its lr, momentum '
                         f'and preconditioning); leave {key}.precond at none and {key}.inner_lr at null')
    return out


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
    ``L_S = L_pix + lambda_tex L_tex [+ lambda_out L_out]``, KRNets meta-learned on
    ``L_pix(S_theta'(x_m), y_m)`` after a virtual student step ``theta'``.

    Args:
        teacher, student, teacher_layers, student_layers: as :class:`~krdistill.distiller.Distiller`.
        krnets: one KRNet per distillation point (training-only; their parameters are ``phi``).
        texture_loss: a :class:`~krdistill.losses.texture_loss.TextureWiseLoss` (its
            ``loss_weight`` is lambda_tex). Default: L1, weight 1.
        pixel_loss: ``(sr, gt) -> scalar``; the student's reconstruction loss, also the meta
            objective. Default: L1.
        output_loss: optional output-KD loss added to the student objective (lambda_out).
        meta: the ``meta:`` options (:data:`META_DEFAULTS`, validated by :func:`check_meta_options`):
            ``every``, ``mode`` (exact | finite_difference), ``inner_lr`` (None: the student's current
            lr), ``precond`` (none | adam), ``update`` (meta | joint | frozen), ``fd_eps``,
            ``virtual_step`` (plain: ``theta - alpha g / P``; optimizer: the step the student's
            optimizer would really take, momentum and bias corrections included,
            :func:`krdistill.meta.optimizer_step`), ``adapters`` (meta | joint | student): how the KRNets' 1x1 alignment convs
            (``adapter_s``, ``adapter_t``) are trained: like the rest of the KRNet (``meta``), on the
            student objective at every iteration like a FitNet regressor (``joint``: both;
            ``student``: only ``adapter_s``). They are stepped by the KRNets' optimizer.
            ``teacher_weight`` (gamma, default 0): the meta objective becomes
            ``L_pix(S_theta'(x_m), y_m) + gamma * L1(S_theta'(x_m), T(x_m))``, agreement with the
            teacher's output on the meta batch beside the ground truth (the teacher output of the
            previous batch is kept from its step; with ``meta_data`` the teacher runs on the meta batch).
            ``objective`` (one_step | horizon): with ``horizon`` (FitNet-branch KRNets only) the branch
            weights get online hypergradients through the student's real optimizer trajectory
            (:class:`~krdistill.meta.HorizonTrace`; ``horizon_decay`` forgets, ``horizon_stride: r``
            samples the branch terms' gradients every r-th step, ``horizon_terms: one`` one term per
            sampled step in turn instead of ``all``), the rest of phi keeps the one-step gradient.
            ``start`` (default 0): meta-learning starts after iteration ``start``. Until then the
            KRNets stay as initialised, no meta step is taken and no horizon trace is kept: the
            run is value for value the same KRNets frozen at init (``update: frozen``). Meta-KD
            that reports gains lets the student train first (a late start).
        meta_data: optional iterable of meta batches, ``(lq, gt)`` pairs or mappings with ``lq`` /
            ``gt`` (a held-out split), cycled. Without it the meta batch is the previous training
            batch whose step was taken (the current one at the first iteration).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_layers: Sequence[str],
                 student_layers: Sequence[str], krnets: Sequence[nn.Module], texture_loss: nn.Module | None = None,
                 pixel_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 output_loss: nn.Module | None = None, meta: Mapping | None = None,
                 meta_data: Iterable | None = None, keys: Mapping[str, str] | None = None):
        texture_loss = texture_loss if texture_loss is not None else TextureWiseLoss()
        if not student_layers:
            raise ValueError('MetaKD needs at least one (teacher_module, student_module) distillation point')
        if len(krnets) != len(student_layers):
            raise ValueError(f'{len(krnets)} KRNets for {len(student_layers)} distillation points')
        terms = [KRTextureTerm(kr, texture_loss) for kr in krnets]
        super().__init__(teacher, student, teacher_layers, student_layers, pair_losses=terms,
                         output_loss=output_loss, pixel_loss=pixel_loss if pixel_loss is not None else nn.L1Loss(),
                         keys=keys)
        self.krnets = nn.ModuleList(krnets)
        self.meta = check_meta_options(meta)
        self._horizon = None
        if self.meta['objective'] == 'horizon' and self.meta['update'] == 'meta':
            if not self.branch_weights():
                raise ValueError('meta.objective: horizon meta-learns the branch weights of KRNets built with '
                                 'network_kr.fitnet_branch: true (b_tex, and b_fit unless learn_fitnet_weight is '
                                 'false); these KRNets have none')
            names = [n for n, p in unwrap(student).named_parameters() if p.requires_grad]
            self._horizon = HorizonTrace(names, len(self.branch_weights()), self.meta['horizon_decay'])
        self._horizon_steps = 0  # student steps seen by the horizon traces (the stride's phase)
        self._started = self.meta['start'] == 0  # meta-learning has started (iteration > meta.start)
        self.set_meta_data(meta_data)
        self._calls = 0          # train_step calls: the iteration when no `it` is given
        self._last_batch = None  # (lq, gt) of the last iteration whose steps were all taken
        self._last_out_t = None  # its teacher output (kept for meta.teacher_weight > 0)

    # ------------------------------------------------------------------ parameters
    def kr_parameters(self) -> list[nn.Parameter]:
        """Every trainable KRNet parameter (what ``optimizer_kr`` holds)."""
        return [p for p in self.krnets.parameters() if p.requires_grad]

    def kd_parameters(self) -> list[nn.Parameter]:
        return []  # the KRNets have their own optimizer

    def joint_kr_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters trained on the student objective at every iteration: all of them with
        ``update='joint'``, else the adapters chosen by ``adapters`` and the regressor of a FitNet
        branch."""
        if self.meta['update'] == 'joint':
            return self.kr_parameters()
        names = {'meta': (), 'joint': ('adapter_s', 'adapter_t'), 'student': ('adapter_s', )}[self.meta['adapters']]
        params = []
        for kr in self.krnets:  # a FitNet branch's regressor is a regressor: trained like FitNet's
            reg = getattr(kr, 'regressor', None) if getattr(kr, 'fitnet_branch', False) else None
            if reg is not None:
                params += [p for p in reg.parameters() if p.requires_grad]
            for name in names:
                mod = getattr(kr, name, None)
                if mod is None:
                    raise AttributeError(f'meta.adapters: {self.meta["adapters"]!r} needs a KRNet with a '
                                         f'{name!r} module; {type(kr).__name__} has none')
                params += [p for p in mod.parameters() if p.requires_grad]
        return params

    def trained_kd_parameters(self) -> list[nn.Parameter]:
        return self.joint_kr_parameters()

    def meta_kr_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters trained by the meta objective (none with ``update='joint'``)."""
        joint = {id(p) for p in self.joint_kr_parameters()}
        return [p for p in self.kr_parameters() if id(p) not in joint]

    def branch_weights(self) -> list[tuple[str, nn.Parameter]]:
        """The learned branch weights of FitNet-branch KRNets, ``(log name, parameter)``:
        ``kr<i>_b_tex`` and (when learned) ``kr<i>_b_fit``."""
        out = []
        for i, kr in enumerate(self.krnets):
            if getattr(kr, 'fitnet_branch', False):
                out += [(f'kr{i}_b_{tag}', p) for tag, p in (('tex', kr.texture_weight), ('fit', kr.fitnet_weight))
                        if p.requires_grad]
        return out

    def one_step_parameters(self) -> list[nn.Parameter]:
        """The meta-learned KRNet parameters the one-step meta gradient trains: all of
        :meth:`meta_kr_parameters`, less the branch weights under ``meta.objective: horizon``."""
        lams = {id(p) for _, p in self.branch_weights()} if self._horizon is not None else set()
        return [p for p in self.meta_kr_parameters() if id(p) not in lams]

    # ------------------------------------------------------------------ meta batches
    def set_meta_data(self, meta_data: Iterable | None) -> None:
        """Draw meta batches from ``meta_data`` (cycled), or from the previous batch when None."""
        self._meta_iter = None if meta_data is None else \
            iter(itertools.chain.from_iterable(itertools.repeat(meta_data)))

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
        return self.meta['update'] == 'meta' and it > self.meta['start'] and it % self.meta['every'] == 0

    # ------------------------------------------------------------------ meta step
    def inner_lr(self, student_optimizer) -> float:
        if self.meta['inner_lr'] is not None:
            return float(self.meta['inner_lr'])
        if student_optimizer is None:
            raise ValueError('meta.inner_lr is null (use the student\'s lr) but no student optimizer was given')
        return float(unwrap_optimizer(student_optimizer).param_groups[0]['lr'])

    def meta_grad(self, lq: torch.Tensor, gt: torch.Tensor, lq_meta: torch.Tensor, gt_meta: torch.Tensor,
                  teacher: TeacherOutput | None = None, student_optimizer=None,
                  out_t_meta: torch.Tensor | None = None) -> 'OrderedDict[str, torch.Tensor]':
        """Set ``.grad`` of :meth:`meta_kr_parameters` to ``d L_meta(theta'(phi)) / d phi``.

        ``theta' = theta - alpha * grad_theta L_S(theta, phi)`` on ``(lq, gt)`` (Adam-preconditioned
        with ``meta.precond: adam``); ``L_meta = L_pix(S_theta'(lq_meta), gt_meta)`` [``+ gamma *
        L1(S_theta'(lq_meta), out_t_meta)`` with ``meta.teacher_weight`` gamma > 0; ``out_t_meta``
        default: the teacher's output on ``lq_meta``]. The student
        is not changed. Under ``torch.distributed`` the virtual step uses the global-batch gradient
        and the KRNet gradients are averaged over ranks. The caller steps the KRNet optimizer.
        Returns detached scalars ``l_meta``, ``meta_grad_norm``, ``t_meta`` (seconds).
        """
        t0 = time.perf_counter()
        teacher = teacher if teacher is not None else self.teacher_forward(lq)
        bare = unwrap(self.student)
        precond = None
        if self.meta['precond'] == 'adam':
            if student_optimizer is None:
                raise ValueError('meta.precond: adam needs the student optimizer')
            precond = adam_preconditioner(unwrap_optimizer(student_optimizer), bare.named_parameters())
        kr_params = self.one_step_parameters()
        step_fn = None
        if self.meta['virtual_step'] == 'optimizer':
            if student_optimizer is None:
                raise ValueError('meta.virtual_step: optimizer needs the student optimizer')
            step_fn = optimizer_step(unwrap_optimizer(student_optimizer), bare.named_parameters())

        # horizon: the kernels' meta gradient is that of the texture term at unit weight
        texture = {'texture': 'unit' if self._horizon is not None else 'weighted'}

        def student_loss(params):
            return self.loss(lq, gt, teacher, params, point_kwargs=texture)[0]

        gamma = float(self.meta['teacher_weight'])
        if gamma > 0 and out_t_meta is None:
            if self.teacher is None:
                raise ValueError('meta.teacher_weight > 0 needs a teacher')
            with torch.no_grad():
                out_t_meta = self.teacher.eval()(lq_meta)

        def meta_loss(params):
            return self._meta_loss_value(functional_call(bare, params, (lq_meta,)), gt_meta, out_t_meta)

        distributed = world_size() > 1
        lr = self.inner_lr(student_optimizer) if step_fn is None else 0.0
        grads, info = meta_gradient(self.student, student_loss, meta_loss, kr_params, lr=lr, mode=self.meta['mode'],
                                    precond=precond, fd_eps=self.meta['fd_eps'],
                                    reduce=_differentiable_mean if distributed else None, step_fn=step_fn)
        average_over_ranks(grads)
        for p, g in zip(kr_params, grads):
            p.grad = g
        return OrderedDict(l_meta=info['l_meta'], meta_grad_norm=info['grad_norm'],
                           t_meta=torch.tensor(time.perf_counter() - t0))

    # ------------------------------------------------------------------ long-horizon credit
    def _meta_loss_value(self, sr: torch.Tensor, gt_meta: torch.Tensor, out_t_meta: torch.Tensor | None):
        loss = self.pixel_loss(sr, gt_meta)
        gamma = float(self.meta['teacher_weight'])
        if gamma > 0:
            loss = loss + gamma * torch.nn.functional.l1_loss(sr, out_t_meta)
        return loss

    def horizon_grad(self, lq_meta: torch.Tensor, gt_meta: torch.Tensor,
                     out_t_meta: torch.Tensor | None = None) -> 'OrderedDict[str, torch.Tensor]':
        """``meta.objective: horizon``: set ``.grad`` of :meth:`branch_weights` to their online
        hypergradients ``<grad_theta L_meta(theta_t), z_k>`` (:class:`~krdistill.meta.HorizonTrace`),
        ``L_meta`` at the student's current parameters on ``(lq_meta, gt_meta)`` (the same meta loss
        as the one-step objective, teacher term included). Returns ``l_meta_horizon`` and, per weight,
        ``<name>_credit`` (``-`` the hypergradient: > 0 means the term helped over the horizon)."""
        if self._horizon is None:
            raise RuntimeError('MetaKD.horizon_grad: meta.objective is not horizon')
        if self.meta['teacher_weight'] > 0 and out_t_meta is None:
            with torch.no_grad():
                out_t_meta = self.teacher.eval()(lq_meta)
        bare = unwrap(self.student)
        named = [(n, p) for n, p in bare.named_parameters() if p.requires_grad]
        loss = self._meta_loss_value(bare(lq_meta), gt_meta, out_t_meta)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        average_over_ranks(grads)
        hyper = self._horizon.hypergradient({n: g for (n, _), g in zip(named, grads)})
        out = OrderedDict(l_meta_horizon=loss.detach())
        for (name, p), h in zip(self.branch_weights(), hyper):
            p.grad = h.to(device=p.device, dtype=p.dtype).reshape(p.shape)
            out[f'{name}_credit'] = -h.detach().float()
        return out

    def _before_backward(self, total: torch.Tensor):
        """Under ``meta.objective: horizon``: ``grad_theta`` of each branch's term (``d L_S /
        d lambda_k``), for the trace of the step about to be taken."""
        if self._horizon is None or not self._started or not torch.is_grad_enabled():
            return None
        self._horizon_steps += 1
        stride = int(self.meta['horizon_stride'])
        if (self._horizon_steps - 1) % stride:
            return {'grads': None, 'scale': 0.0}  # not sampled at this step: the traces still advance
        lams = [p for _, p in self.branch_weights()]
        named = [(n, p) for n, p in unwrap(self.student).named_parameters() if p.requires_grad]
        terms = torch.autograd.grad(total, lams, create_graph=True, allow_unused=True)
        # horizon_terms: one -- one branch term per sampled step, in turn, times their number: the
        # traces stay unbiased and a sampled step costs one backward however many points there are
        pick = None
        if self.meta['horizon_terms'] == 'one' and len(lams) > 1:
            pick = ((self._horizon_steps - 1) // stride) % len(lams)
        out = []
        for k, a in enumerate(terms):
            if a is None or not a.requires_grad or (pick is not None and k != pick):
                out.append({})
                continue
            g = torch.autograd.grad(a, [p for _, p in named], retain_graph=True, allow_unused=True)
            g = [x if pick is None or x is None else x * len(lams) for x in g]
            average_over_ranks([x for x in g if x is not None])
            out.append({n: x.detach() for (n, _), x in zip(named, g) if x is not None})
        return {'grads': out, 'scale': float(stride)}

    def _after_step(self, optimizer, pending) -> None:
        if pending is not None and self._horizon is not None:
            bare = unwrap(self.student)
            self._horizon.update(unwrap_optimizer(optimizer), dict(bare.named_parameters()), pending['grads'],
                                 scale=pending['scale'])

    # ------------------------------------------------------------------ the iteration
    def train_step(self, lq: torch.Tensor, gt: torch.Tensor, optimizer, optimizer_kr=None, *,
                   teacher: TeacherOutput | None = None, it: int | None = None) -> StepResult:
        """One MetaKD iteration: the meta step on meta iterations, then the student step.

        Args:
            optimizer: the student's optimizer (or an mmengine ``OptimWrapper``); its current lr is
                the virtual step size unless ``meta.inner_lr`` is set, and ``meta.precond: adam``
                reads its state.
            optimizer_kr: the KRNets' optimizer; needed unless ``meta.update`` is ``frozen`` with
                no joint adapters.
            teacher: ``(out_t, feats_t)`` of this batch, e.g. from a cache; default one teacher forward.
            it: the 1-based iteration (the meta schedule); default the number of calls so far.

        Returns:
            :class:`~krdistill.distiller.StepResult`: ``logs`` (``l_total``, ``l_pix``,
            ``l_texture`` [, ``l_kd_out``] [, ``l_meta``, ``meta_grad_norm``, ``t_meta``]) and
            ``skipped`` (why a step was not taken, or None).
        """
        self._calls += 1
        it = self._calls if it is None else int(it)
        if optimizer_kr is None and (self.kr_parameters() and self.meta['update'] != 'frozen'
                                     or self.joint_kr_parameters()):
            raise ValueError('MetaKD.train_step: optimizer_kr is needed to train the KRNets')
        teacher = teacher if teacher is not None else self.teacher_forward(lq)
        self._started = it > self.meta['start']
        info: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        skipped = None
        if self.is_meta_iter(it):
            optimizer_kr.zero_grad(set_to_none=True)
            checked = []
            if self._horizon is not None:  # branch weights: credit over the trajectory, on an unseen batch
                if self._meta_iter is not None:
                    lq_h, gt_h = self.meta_batch(lq, gt)
                    out_h = None
                else:  # the current batch: the student has not stepped on it yet
                    lq_h, gt_h, out_h = lq, gt, teacher[0]
                info.update(self.horizon_grad(lq_h, gt_h, out_t_meta=out_h))
                checked += [info['l_meta_horizon']] + [p.grad for _, p in self.branch_weights()]
            if self.one_step_parameters():
                lq_m, gt_m = self.meta_batch(lq, gt)
                out_t_m = None
                if self._meta_iter is None:  # the meta batch is a training batch: its teacher output is known
                    out_t_m = teacher[0] if lq_m is lq else self._last_out_t
                info.update(self.meta_grad(lq, gt, lq_m, gt_m, teacher, student_optimizer=optimizer,
                                           out_t_meta=out_t_m))
                checked += [info['l_meta']] + [p.grad for p in self.one_step_parameters()]
            if all_finite(checked):
                optimizer_kr.step()
                with torch.no_grad():  # projected step: a branch weight below 0 would be a silent 0 that
                    for _, p in self.branch_weights():  # has to climb back; keep it at 0, ready to rise
                        p.clamp_(min=0)
            else:
                skipped = 'non-finite meta loss or KRNet meta gradients'
            optimizer_kr.zero_grad(set_to_none=True)
        joint = optimizer_kr if self.joint_kr_parameters() else None
        # At b_tex = 0 the texture maps add exactly 0 to the student step; leave them out unless this
        # step's gradient to b_tex is used: update joint (b_tex trained on the student objective) or a
        # step the horizon traces sample (d L_S / d b_tex).
        sampled = self._horizon is not None and self._started and \
            self._horizon_steps % int(self.meta['horizon_stride']) == 0
        texture = 'skip_zero' if self.meta['update'] != 'joint' and not sampled else 'weighted'
        step = self.student_step(lq, gt, optimizer, teacher, extra_optimizer=joint,
                                 point_kwargs={'texture': texture})
        step.logs.update(info)
        for i, term in enumerate(self.pair_losses):  # what each KRNet transferred in the student step
            step.logs.update((f'kr{i}_{k}', v) for k, v in term.stats.items() if v.dim() == 0)
        step.skipped = '; '.join(s for s in (skipped, step.skipped) if s) or None
        if step.skipped is None:  # a bad batch is never the next meta batch
            self._last_batch = (lq.detach(), gt.detach())
            keep = self.meta['teacher_weight'] > 0 and teacher[0] is not None
            self._last_out_t = teacher[0].detach() if keep else None
        return step

    # ------------------------------------------------------------------ checkpoints
    def meta_state_dict(self, keep_batch: bool = True) -> dict:
        """The meta fallback state: the call counter and (``keep_batch``) the last batch seen."""
        state: dict[str, Any] = {'calls': self._calls}
        if keep_batch and self._last_batch is not None:
            state['last_batch'] = [t.detach().cpu().clone() for t in self._last_batch]
            if self._last_out_t is not None:
                state['last_out_t'] = self._last_out_t.detach().cpu().clone()
        if self._horizon is not None:
            state['horizon'] = dict(self._horizon.state_dict(), steps=self._horizon_steps)
        return state

    def load_meta_state_dict(self, state: Mapping) -> None:
        self._calls = int(state.get('calls', 0))
        batch = state.get('last_batch')
        if batch is not None:
            device = next(iter(unwrap(self.student).parameters())).device
            self._last_batch = tuple(t.to(device) for t in batch)
        else:
            self._last_batch = None
        out_t = state.get('last_out_t')
        self._last_out_t = out_t.to(device) if out_t is not None and self._last_batch is not None else None
        if self._horizon is not None and state.get('horizon') is not None:
            device = next(iter(unwrap(self.student).parameters())).device
            self._horizon.load_state_dict(state['horizon'], device)
            self._horizon_steps = int(state['horizon'].get('steps', 0))

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


def _differentiable_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Differentiable mean over ranks (the virtual step then uses the global-batch gradient)."""
    from torch.distributed.nn.functional import all_reduce
    world = torch.distributed.get_world_size()
    return [all_reduce(t.contiguous()) / world for t in tensors]
