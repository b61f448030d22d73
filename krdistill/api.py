"""MetaKD as a drop-in for any PyTorch SR training loop (torch only; no BasicSR, no mmengine).

Reconstructed from the abstract of Zhu, Liu, Chen, arXiv 2207.08356 (design note METAKD.md).
:class:`MetaKD` wires the framework-free core :class:`~krdistill.metakd.MetaDistiller` the way
BasicSR's ``MetaKDModel`` does, from the same option blocks (same names, same defaults):
channels of the distillation points are read by one dummy forward (:func:`~krdistill.distiller.probe`),
one KRNet is built per point from ``network_kr``, the losses from ``texture_opt`` /
``output_kd_opt`` / ``pixel_opt``, the KRNets' optimizer from ``optim_kr`` and the meta update
from ``meta``. A plain loop::

    from krdistill.api import MetaKD

    mkd = MetaKD(teacher, student, pairs=[('body.31', 'body.15')],
                 network_kr=dict(type='KRNet', width=64),
                 texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                 pixel_opt=dict(type='L1Loss', loss_weight=1.0),
                 optim_kr=dict(type='Adam', lr=1e-4, betas=(0.9, 0.999)),
                 meta=dict(every=1, mode='exact'))
    opt = torch.optim.Adam(student.parameters(), 2e-4)
    for lq, gt in loader:
        logs = mkd.train_step(lq, gt, opt)       # meta update (every `every` calls), then the student step
        # logs: l_total, l_pix, l_texture[, l_kd_out][, l_meta, meta_grad_norm, t_meta]

or the same iteration spelled out, for loops that own their backward (AMP, clipping, ...)::

    logs = mkd.meta_update(lq, gt, student_optimizer=opt)    # {} on non-meta iterations
    loss, terms, sr = mkd.loss(lq, gt)                       # L_pix + L_tex [+ L_out], parts for logging
    opt.zero_grad()
    mkd.backward(loss)                                       # into the student only (update='meta')
    opt.step()

Checkpointing: ``mkd.state_dict()`` holds the KRNets, ``optimizer_kr`` and the meta fallback
state (the last batch seen and the call counter); save it next to the student and restore it
with ``mkd.load_state_dict(...)``. The teacher and the student belong to the caller and are not
in it. The deployed network is the plain student.
"""
from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .archs.krnet_arch import KRNet
from .distiller import probe
from .features import unwrap
from .losses.kd_loss import _REDUCTIONS, OutputKDLoss, _reduce
from .losses.texture_loss import TextureWiseLoss
from .metakd import MetaDistiller, check_meta_options

__all__ = ['MetaKD', 'L1Loss', 'MSELoss', 'CharbonnierLoss', 'OPTIMIZERS', 'LOSSES', 'ARCHS',
           'build_optimizer', 'build_module']



class _PixelLoss(nn.Module):
    """``loss_weight * reduce(rho(pred - target))``: the same arithmetic as BasicSR's pixel losses
    (elementwise loss, then ``mean()`` / ``sum()``), so both front ends give the same numbers."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean'):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'{type(self).__name__}: reduction must be one of {_REDUCTIONS}, got {reduction!r}')
        self.loss_weight = loss_weight
        self.reduction = reduction

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * _reduce(self.elementwise(pred, target), self.reduction)

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}, reduction={self.reduction!r}'


class L1Loss(_PixelLoss):
    """``loss_weight * mean|pred - target|`` (BasicSR's ``L1Loss`` without element weights)."""

    def elementwise(self, pred, target):
        return F.l1_loss(pred, target, reduction='none')


class MSELoss(_PixelLoss):
    """``loss_weight * mean (pred - target)^2`` (BasicSR's ``MSELoss`` without element weights)."""

    def elementwise(self, pred, target):
        return F.mse_loss(pred, target, reduction='none')


class CharbonnierLoss(_PixelLoss):
    """``loss_weight * mean sqrt((pred - target)^2 + eps)`` (BasicSR's ``CharbonnierLoss``; note
    ``eps`` is added to the square, default 1e-12, as in BasicSR)."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean', eps: float = 1e-12):
        super().__init__(loss_weight, reduction)
        self.eps = eps

    def elementwise(self, pred, target):
        return torch.sqrt((pred - target)**2 + self.eps)


#: ``optim_kr.type`` -> optimizer class (BasicSR's ``get_optimizer`` subset used by krdistill)
OPTIMIZERS: dict[str, type] = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}
#: loss ``type`` -> class, for ``texture_opt``, ``output_kd_opt`` and ``pixel_opt``
LOSSES: dict[str, type] = {'TextureWiseLoss': TextureWiseLoss, 'OutputKDLoss': OutputKDLoss, 'L1Loss': L1Loss,
                           'MSELoss': MSELoss, 'CharbonnierLoss': CharbonnierLoss}
#: ``network_kr.type`` -> class
ARCHS: dict[str, type] = {'KRNet': KRNet}

#: defaults of the option blocks (as in ``MetaKDModel``; ``optim_kr`` has no ``optim_g`` to fall back on here)
DEFAULTS = dict(network_kr={'type': 'KRNet'}, texture_opt={'type': 'TextureWiseLoss'},
                pixel_opt={'type': 'L1Loss', 'loss_weight': 1.0}, output_kd_opt=None,
                optim_kr={'type': 'Adam', 'lr': 1e-4, 'betas': (0.9, 0.999)})


def _plain(opt: Any) -> Any:
    """A deep copy with mappings turned into dicts (mmengine ``ConfigDict`` included)."""
    if isinstance(opt, Mapping):
        return {k: _plain(v) for k, v in opt.items()}
    if isinstance(opt, list):
        return [_plain(v) for v in opt]
    return copy.deepcopy(opt)


def build_module(opt: Any, table: Mapping[str, type], key: str, allow_instance: bool = True, **filled: Any) -> Any:
    """Build ``opt`` (a ``{'type': name_or_class, **kwargs}`` mapping, or a bare class) from ``table``.

    With ``allow_instance`` a module or any other callable is returned unchanged (bring your own
    loss). ``filled``: keyword arguments read from the networks (``s_channels``, ``t_channels``);
    setting them in ``opt`` is an error. Errors name ``key``.
    """
    if isinstance(opt, type):
        opt = {'type': opt}
    if not isinstance(opt, Mapping):
        if allow_instance and callable(opt):
            return opt
        what = 'a mapping with a "type" key' + (' or a module' if allow_instance else '')
        raise TypeError(f'{key}: expected {what}, got {type(opt).__name__}')
    opt = _plain(opt)
    typ = opt.pop('type', None)
    if isinstance(typ, str):
        if typ not in table:
            raise KeyError(f'{key}.type: {typ!r} is not one of {sorted(table)} (or pass a class or a module)')
        cls = table[typ]
    elif isinstance(typ, type):
        cls = typ
    else:
        raise KeyError(f'{key}.type: missing or invalid ({typ!r}); one of {sorted(table)} or a class')
    for k in filled:
        if k in opt:
            raise KeyError(f'{key}.{k}: do not set it; it is read from the networks')
    try:
        return cls(**opt, **filled)
    except TypeError as e:
        raise TypeError(f'{key}: cannot build {cls.__name__} from {opt}: {e}') from e


def build_optimizer(opt: Mapping | None, params: Sequence[nn.Parameter], key: str = 'optim_kr'):
    """``torch.optim`` optimizer from ``{'type': 'Adam' | 'AdamW' | 'SGD' | class, 'lr': ..., ...}``."""
    opt = _plain(dict(opt) if opt is not None else DEFAULTS['optim_kr'])
    typ = opt.pop('type', None)
    cls = OPTIMIZERS.get(typ) if isinstance(typ, str) else typ
    if not isinstance(cls, type):
        raise NotImplementedError(f'{key}.type: {typ!r} is not supported; use one of {sorted(OPTIMIZERS)} or a class')
    if 'lr' not in opt:
        raise KeyError(f'{key}.lr: required')
    try:
        return cls(params, **opt)
    except (TypeError, ValueError) as e:
        raise type(e)(f'{key}: cannot build {cls.__name__} from {opt}: {e}') from e


def _raw_optimizer(optimizer):
    """The ``torch.optim`` optimizer under a wrapper (mmengine's ``OptimWrapper`` has ``.optimizer``)."""
    return getattr(optimizer, 'optimizer', optimizer)


def _first_in_channels(net: nn.Module, default: int = 3) -> int:
    for m in unwrap(net).modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return default


def _device_of(net: nn.Module) -> torch.device:
    for t in itertools.chain(unwrap(net).parameters(), unwrap(net).buffers()):
        return t.device
    return torch.device('cpu')


def _default_backward(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    loss.backward(inputs=list(inputs))


class MetaKD:
    """Meta knowledge distillation for any PyTorch SR training loop (MetaKD, arXiv 2207.08356).

    Builds the KRNets, losses and KRNet optimizer from the option blocks of the YAML front end and
    drives :class:`~krdistill.metakd.MetaDistiller` with BasicSR ``MetaKDModel``'s iteration order:
    teacher forward (once per batch, no graph); on meta iterations the meta step on the KRNets;
    then the student step on ``L_S = L_pix + lambda_tex L_tex [+ lambda_out L_out]``.

    Args:
        teacher: trained teacher; frozen here (``eval``, no grad), never saved.
        student: the student (may be DataParallel/DDP-wrapped); owned and stepped by the caller.
        pairs: ``[(teacher_module_name, student_module_name), ...]``, dotted names from
            ``named_modules()`` of the bare networks; one KRNet per pair.
        network_kr: KRNet options ``{'type': 'KRNet', width, num_kernels, kernel_size, corr_radius,
            hidden, use_correlation, dynamic, per_pixel, normalize}``; ``s_channels`` and
            ``t_channels`` are read from the networks. Default ``{'type': 'KRNet'}``.
        texture_opt: the texture-wise loss ``{'type': 'TextureWiseLoss', loss_weight, criterion, eps}``.
        output_kd_opt: optional output KD ``{'type': 'OutputKDLoss', loss_weight}``. Default off.
        pixel_opt: the student's reconstruction loss, also the meta objective:
            ``{'type': 'L1Loss' | 'MSELoss' | 'CharbonnierLoss', loss_weight, reduction}``.
            Default L1, weight 1.
        optim_kr: the KRNets' optimizer ``{'type': 'Adam' | 'AdamW' | 'SGD', 'lr': ..., ...}``.
            Default Adam, lr 1e-4, betas (0.9, 0.999) (the YAML falls back on ``optim_g``; a loop
            has no such block).
        meta: ``every``, ``mode`` (exact | finite_difference), ``inner_lr`` (None: the student's
            current lr), ``precond`` (none | adam), ``update`` (meta | joint | frozen), ``fd_eps``;
            defaults :data:`krdistill.metakd.META_DEFAULTS`.
        example_input: an LR batch for the dummy forward that reads channel counts. Default a
            ``1 x C x 16 x 16`` random tensor (C: the student's first conv) on the student's device.
        meta_data: optional iterable of meta batches, ``(lq, gt)`` pairs or mappings with ``lq`` /
            ``gt`` (a held-out split; ``datasets.meta`` of the YAML), cycled forever. Without it
            the meta batch is the previous training batch (the current one at the first call).

    Every type may also be a class, and every loss option a ready module (e.g.
    ``pixel_opt=torch.nn.L1Loss()``). Attributes: ``distiller`` (the
    :class:`~krdistill.metakd.MetaDistiller`), ``krnets``, ``optimizer_kr`` (any object with
    ``zero_grad``/``step``/``state_dict``/``load_state_dict``: a torch optimizer, or an mmengine
    ``OptimWrapper`` assigned by a framework front end), ``meta`` (the filled meta options).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, pairs: Sequence[Sequence[str]], *,
                 network_kr: Mapping | None = None, texture_opt: Mapping | nn.Module | None = None,
                 output_kd_opt: Mapping | nn.Module | None = None,
                 pixel_opt: Mapping | Callable | None = None, optim_kr: Mapping | None = None,
                 meta: Mapping | None = None, example_input: torch.Tensor | None = None,
                 meta_data: Iterable | None = None) -> None:
        pairs = [tuple(p) for p in pairs]
        if not pairs:
            raise ValueError('pairs: MetaKD needs at least one (teacher_module, student_module) pair')
        for i, p in enumerate(pairs):
            if len(p) != 2 or not all(isinstance(n, str) for n in p):
                raise TypeError(f'pairs[{i}]: expected (teacher_module_name, student_module_name), got {p!r}')
        self.pairs = pairs
        t_layers, s_layers = [p[0] for p in pairs], [p[1] for p in pairs]
        self.meta = check_meta_options(dict(meta) if meta is not None else None)
        device = _device_of(student)

        # One dummy forward of each network: names exist, scales agree, channels known.
        if example_input is None:
            gen = torch.Generator().manual_seed(0)  # leave the caller's RNG stream alone
            example_input = torch.rand(1, _first_in_channels(student), 16, 16, generator=gen)
        example_input = example_input.to(device)
        keys = dict(teacher_layers='pairs (teacher module names)', student_layers='pairs (student module names)')
        out_t, shapes_t = probe(teacher, t_layers, example_input, key=keys['teacher_layers'])
        out_s, shapes_s = probe(student, s_layers, example_input, key=keys['student_layers'])
        if out_t[-1] != out_s[-1] or out_t[-2] != out_s[-2]:
            raise ValueError(f'scale mismatch: on a {tuple(example_input.shape)} input the teacher gives '
                             f'{out_t} and the student {out_s}; teacher and student must upscale alike')

        kr_opt = network_kr if network_kr is not None else DEFAULTS['network_kr']
        krnets = [build_module(kr_opt, ARCHS, 'network_kr', allow_instance=False, s_channels=ss[1], t_channels=ts[1])
                  for ss, ts in zip(shapes_s, shapes_t)]
        texture_loss = build_module(texture_opt if texture_opt is not None else DEFAULTS['texture_opt'], LOSSES,
                                    'texture_opt')
        output_loss = build_module(output_kd_opt, LOSSES, 'output_kd_opt') if output_kd_opt is not None else None
        pixel_loss = build_module(pixel_opt if pixel_opt is not None else DEFAULTS['pixel_opt'], LOSSES, 'pixel_opt')
        self.distiller = MetaDistiller(teacher, student, t_layers, s_layers, krnets, texture_loss=texture_loss,
                                       pixel_loss=pixel_loss, output_loss=output_loss, meta=self.meta,
                                       keys=keys).to(device)
        self._setup(self.distiller, build_optimizer(optim_kr, self.distiller.kr_parameters(), 'optim_kr'), meta_data)

    @classmethod
    def from_distiller(cls, distiller: MetaDistiller, optimizer_kr, meta_data: Iterable | None = None) -> 'MetaKD':
        """Drive an already built :class:`~krdistill.metakd.MetaDistiller` and KRNet optimizer.

        For framework front ends that build KRNets and losses from their own registries (BasicSR's
        ``MetaKDModel``): the iteration logic stays this class's.
        """
        self = cls.__new__(cls)
        self.pairs = list(zip(distiller.teacher_layers, distiller.student_layers))
        self.meta = distiller.meta
        self._setup(distiller, optimizer_kr, meta_data)
        return self

    def _setup(self, distiller: MetaDistiller, optimizer_kr, meta_data: Iterable | None) -> None:
        self.distiller = distiller
        self.krnets = distiller.krnets
        self.optimizer_kr = optimizer_kr
        self.set_meta_data(meta_data)
        self._calls = 0               # meta_update calls: the iteration counter when no `it` is given
        self._batch = None            # (lq, gt) of the current iteration
        self._prev_batch = None       # (lq, gt) of the iteration before: the meta fallback
        self._t_cache = None          # (lq, version, out_t, feats_t): the teacher runs once per batch

    # ------------------------------------------------------------------ accessors
    @property
    def teacher(self) -> nn.Module:
        return self.distiller.teacher

    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    def kr_parameters(self) -> list[nn.Parameter]:
        """The KRNet parameters ``phi`` (what ``optimizer_kr`` steps)."""
        return self.distiller.kr_parameters()

    def to(self, device) -> 'MetaKD':
        """Move the KRNets and losses (not the caller's teacher and student)."""
        self.distiller.to(device)
        return self

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(pairs={self.pairs}, meta={self.meta},\n  krnets={self.krnets},\n'
                f'  optimizer_kr={type(_raw_optimizer(self.optimizer_kr)).__name__})')

    # ------------------------------------------------------------------ batches
    def set_meta_data(self, meta_data: Iterable | None) -> None:
        """Draw meta batches from ``meta_data`` (cycled), or from the previous batch when None."""
        self._meta_iter = None if meta_data is None else \
            iter(itertools.chain.from_iterable(itertools.repeat(meta_data)))

    def _see(self, lq: torch.Tensor, gt: torch.Tensor) -> None:
        """Record the current batch; the one before becomes the meta fallback."""
        if self._batch is None or self._batch[0] is not lq:
            self._prev_batch, self._batch = self._batch, (lq, gt)

    def forget_batch(self) -> None:
        """Do not use the current batch as the next meta fallback (e.g. its loss was not finite)."""
        self._batch = self._prev_batch

    def end_iteration(self) -> None:
        """Drop the cached teacher output and features of this batch (memory)."""
        self._t_cache = None

    def next_meta_batch(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta batch for the current ``(lq, gt)``: from ``meta_data`` if set, else the previous
        training batch, else (first iteration) the current one."""
        if self._meta_iter is not None:
            data = next(self._meta_iter)
            lq_m, gt_m = (data['lq'], data['gt']) if isinstance(data, Mapping) else data[:2]
            return lq_m.to(lq.device), gt_m.to(gt.device)
        if self._prev_batch is not None:
            return self._prev_batch
        return lq, gt

    def teacher_forward(self, lq: torch.Tensor):
        """Teacher output and features for ``lq`` (no graph); computed once per batch."""
        c = self._t_cache
        if c is not None and c[0] is lq and c[1] == lq._version:
            return c[2], c[3]
        out_t, feats_t = self.distiller.teacher_forward(lq)
        self._t_cache = (lq, lq._version, out_t, feats_t)
        return out_t, feats_t

    # ------------------------------------------------------------------ the iteration
    def loss(self, lq: torch.Tensor, gt: torch.Tensor):
        """Student objective on a batch: ``(total, terms, sr)``.

        ``terms`` (an OrderedDict, for logging) holds ``l_pix``, ``l_texture`` (summed over the
        pairs) and ``l_kd_out`` when ``output_kd_opt`` is set; ``total`` is their sum (with graph).
        """
        self._see(lq, gt)
        out_t, feats_t = self.teacher_forward(lq)
        return self.distiller.objective(lq, gt, out_t, feats_t)

    def is_meta_iter(self, it: int) -> bool:
        """Whether iteration ``it`` (1-based) runs a meta update (``update='meta'`` and ``it % every == 0``)."""
        return self.distiller.is_meta_iter(it)

    def meta_update(self, lq: torch.Tensor, gt: torch.Tensor, lq_meta: torch.Tensor | None = None,
                    gt_meta: torch.Tensor | None = None, *, student_optimizer=None, it: int | None = None,
                    step_if: Callable[[dict], bool] | None = None) -> dict:
        """The meta update of the KRNets; call it once per iteration, before the student step.

        Runs when ``is_meta_iter(it)`` (``it``: 1-based iteration; default: the number of calls so
        far): a virtual student step on ``(lq, gt)``, ``L_meta = L_pix`` of the virtually stepped
        student on the meta batch (``lq_meta, gt_meta``; default :meth:`next_meta_batch`), and one
        ``optimizer_kr`` step on ``grad_phi L_meta``. The student and its optimizer are untouched.

        Args:
            student_optimizer: the student's optimizer (or an mmengine ``OptimWrapper``); its current
                lr is the virtual step size unless ``meta.inner_lr`` is set, and ``meta.precond: adam``
                reads its state.
            step_if: ``info -> bool``, called after the meta gradient is set; the KRNet step is
                taken only if it returns True (e.g. a non-finite guard).

        Returns:
            ``{}`` on other iterations, else detached scalars ``l_meta``, ``meta_grad_norm``, ``t_meta``.
        """
        self._calls += 1
        it = self._calls if it is None else int(it)
        self._see(lq, gt)
        if not self.is_meta_iter(it):
            return {}
        if (lq_meta is None) != (gt_meta is None):
            raise ValueError('meta_update: give both lq_meta and gt_meta, or neither')
        if lq_meta is None:
            lq_meta, gt_meta = self.next_meta_batch(lq, gt)
        out_t, feats_t = self.teacher_forward(lq)
        self.optimizer_kr.zero_grad(set_to_none=True)
        info = self.distiller.meta_step(lq, gt, lq_meta, gt_meta, out_t, feats_t,
                                        student_optimizer=_raw_optimizer(student_optimizer))
        if step_if is None or step_if(info):
            self.optimizer_kr.step()
        return info

    def grad_inputs(self) -> list[torch.Tensor]:
        """What the student objective is differentiated for: the student's parameters, plus the
        KRNets' with ``meta.update: joint``."""
        return self.distiller.grad_inputs()

    def backward(self, loss: torch.Tensor,
                 backward: Callable[..., None] | None = None, step_if: Callable[[], bool] | None = None) -> None:
        """Backward of the student objective into :meth:`grad_inputs` only.

        KRNet gradients are cleared first; the KRNet parameters trained on the student objective
        (all with ``update='joint'``, the adapters with ``adapters: joint|student``) are stepped
        here on their ``grad L_S``. ``backward(loss, inputs=...)``: your own backward (e.g. an AMP scaler's or
        mmengine's ``optim_wrapper.backward``). ``step_if``: ``() -> bool``, the joint KRNet step is
        taken only if it returns True. The caller steps the student's optimizer.
        """
        self.optimizer_kr.zero_grad(set_to_none=True)
        (backward or _default_backward)(loss, inputs=self.grad_inputs())
        if self.distiller.joint_kr_parameters() and (step_if is None or step_if()):
            self.optimizer_kr.step()  # only the joint parameters have gradients

    def train_step(self, lq: torch.Tensor, gt: torch.Tensor, student_optimizer, lq_meta: torch.Tensor | None = None,
                   gt_meta: torch.Tensor | None = None, *, it: int | None = None,
                   backward: Callable[..., None] | None = None) -> 'OrderedDict[str, torch.Tensor]':
        """One full iteration, in ``MetaKDModel.optimize_parameters``' order: meta update (on meta
        iterations), ``student_optimizer.zero_grad()``, student objective, :meth:`backward`,
        ``student_optimizer.step()``.

        Returns detached logs: ``l_total``, ``l_pix``, ``l_texture`` [, ``l_kd_out``] [, ``l_meta``,
        ``meta_grad_norm``, ``t_meta``].
        """
        info = self.meta_update(lq, gt, lq_meta, gt_meta, student_optimizer=student_optimizer, it=it)
        student_optimizer.zero_grad(set_to_none=True)
        total, terms, _ = self.loss(lq, gt)
        self.backward(total, backward)
        student_optimizer.step()
        self.end_iteration()  # do not hold the teacher's features until the next batch
        logs = OrderedDict(l_total=total.detach())
        logs.update((k, v.detach()) for k, v in terms.items())
        logs.update(info)
        return logs

    # ------------------------------------------------------------------ checkpoints
    def meta_state_dict(self, keep_batch: bool = True) -> dict:
        """The meta fallback state: the call counter and (``keep_batch``) the last batch seen."""
        state: dict[str, Any] = {'calls': self._calls}
        if keep_batch and self._batch is not None:
            state['last_batch'] = [t.detach().clone() for t in self._batch]
        return state

    def load_meta_state_dict(self, state: Mapping) -> None:
        self._calls = int(state.get('calls', 0))
        batch = state.get('last_batch')
        self._batch = tuple(batch) if batch is not None else None
        self._prev_batch = None
        self._t_cache = None

    def state_dict(self, keep_batch: bool = True) -> dict:
        """``{'krnets', 'optimizer_kr', 'meta_state'}``: the whole training-only KD state (tensors,
        numbers and strings only: loads with ``torch.load(..., weights_only=True)``)."""
        return {'krnets': self.krnets.state_dict(), 'optimizer_kr': self.optimizer_kr.state_dict(),
                'meta_state': self.meta_state_dict(keep_batch)}

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Restore :meth:`state_dict`; with ``strict`` every part must be present."""
        missing = [k for k in ('krnets', 'optimizer_kr', 'meta_state') if k not in state]
        if strict and missing:
            raise KeyError(f'MetaKD.load_state_dict: missing {missing} (has {sorted(state)})')
        if 'krnets' in state:
            self.krnets.load_state_dict(state['krnets'], strict=strict)
        if 'optimizer_kr' in state:
            self.optimizer_kr.load_state_dict(state['optimizer_kr'])
        if 'meta_state' in state:
            self.load_meta_state_dict(state['meta_state'])
