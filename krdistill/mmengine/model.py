"""MetaKD in mmengine: ``MMEngineMetaKDModel`` (MODELS) and ``MetaKDOptimWrapperConstructor``.

**Why a model and not a hook.** mmengine puts optimisation inside the model:
``IterBasedTrainLoop`` calls ``model.train_step(data, optim_wrapper)`` and the model decides what
is stepped and how (this is how mmengine/MMagic GANs drive two optimizers). MetaKD's iteration is
one such multi-optimizer step: the teacher's features of the batch feed both the meta step and
the student step, the meta step must run *between* the teacher forward and the student update
of the *same* batch, and the KRNets have their own optimizer. A ``MetaKDHook`` calling the meta
update in ``before_train_iter`` would (a) see the raw batch before the data preprocessor, (b) run
the teacher a second time or share its features with the model through side channels, and (c)
own a KRNet optimizer the Runner knows nothing about, so it would need its own checkpoint, resume
and LR-schedule plumbing. As a ``BaseModel`` with an ``OptimWrapperDict``, everything is the
Runner's ordinary machinery: ``optim_wrapper.student`` / ``optim_wrapper.krnets`` are built by
:class:`MetaKDOptimWrapperConstructor` and saved/resumed by the Runner, ``param_scheduler``
applies to both (as ``train.scheduler`` does for ``optimizer_kr`` in BasicSR), the checkpoint's
``state_dict`` holds ``student.*``, ``krnets.*`` and the meta fallback state (``_extra_state``);
``val_step``/``test_step`` run the plain student.

The iteration itself is :meth:`krdistill.metakd.MetaKD.train_step` (the same code as the plain-loop
API and BasicSR's ``MetaKDModel`` order), with the student stepped through its ``OptimWrapper``
(its ``backward`` and ``step``: clipping / AMP settings of the wrapper apply to the student step;
the meta step itself runs in full precision). Types are looked up in mmengine's ``MODELS`` first,
then in BasicSR's registries or krdistill's tables (:func:`resolve`).

Config (see ``options/mmengine/metakd_tiny_x2.py``)::

    custom_imports = dict(imports=['krdistill.mmengine'], allow_failed_imports=False)
    model = dict(type='MMEngineMetaKDModel',
                 teacher=dict(type='EDSR', ...), teacher_ckpt='teacher.pth', teacher_param_key='params',
                 student=dict(type='EDSR', ...),
                 pairs=[('body.31', 'body.15')],
                 network_kr=dict(type='KRNet', width=64), texture_opt=dict(type='TextureWiseLoss'),
                 pixel_opt=dict(type='L1Loss'), meta=dict(every=1, mode='exact'))
    optim_wrapper = dict(constructor='MetaKDOptimWrapperConstructor',
                         student=dict(optimizer=dict(type='Adam', lr=2e-4, betas=(0.9, 0.99))),
                         krnets=dict(optimizer=dict(type='Adam', lr=1e-4)))

Multi-GPU: mmengine's default ``MMDistributedDataParallel`` bypasses a model's ``train_step``;
use ``model_wrapper_cfg = dict(type='MMSeparateDistributedDataParallel')`` as mmengine's
multi-optimizer models do (it wraps ``student`` and ``krnets`` separately and calls this
``train_step``; the KRNet meta gradients are averaged over ranks by the meta step). Not exercised
by the tests (CPU, one process).

Data: each batch is a mapping with ``lq`` (B x C x h x w) and ``gt`` (B x C x H x W), e.g. from
:class:`~krdistill.mmengine.data.SyntheticSRDataset` with ``collate_fn=dict(type='default_collate')``
(lists from mmengine's default ``pseudo_collate`` are stacked).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapperDict
from mmengine.registry import MODELS
from torch import nn

from ..build import build_metakd, default_resolver, plain
from ..distiller import freeze_teacher
from ..io import load_weights
from .compat import CHECKPOINT_GLOBALS

__all__ = ['MMEngineMetaKDModel', 'MetaKDOptimWrapperConstructor', 'build_sr_network', 'resolve']

_OPTIM_KEYS = ('student', 'krnets')
_OPTIM_EXAMPLE = ("optim_wrapper = dict(constructor='MetaKDOptimWrapperConstructor', "
                  "student=dict(optimizer=dict(type='Adam', lr=2e-4)), krnets=dict(optimizer=dict(type='Adam', lr=1e-4)))")


def resolve(kind: str, name: str):
    """``type`` lookup of the mmengine front end: mmengine's ``MODELS`` (scope-aware) first, then
    BasicSR's registries (when installed) or krdistill's torch-only tables."""
    cls = MODELS.get(name)
    return cls if cls is not None else default_resolver(kind, name)


def build_sr_network(cfg, key: str) -> nn.Module:
    """Build a network from ``MODELS`` (scope-aware), or from BasicSR's ARCH_REGISTRY when BasicSR
    is installed and ``type`` is not in ``MODELS``. A module is returned unchanged."""
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, Mapping) or 'type' not in cfg:
        raise TypeError(f'{key}: expected a config dict with a "type" key or a module, got {cfg!r}')
    typ = cfg['type']
    if not isinstance(typ, str) or MODELS.get(typ) is not None:
        return MODELS.build(cfg)
    cls = default_resolver('arch', typ)
    if cls is None:
        raise KeyError(f'{key}.type: {typ!r} is neither in mmengine\'s MODELS nor (BasicSR not installed or no such '
                       'arch) in BasicSR\'s ARCH_REGISTRY')
    opt = plain(cfg)
    opt.pop('type')
    return cls(**opt)


def _stack(x):
    return torch.stack(list(x)) if isinstance(x, (list, tuple)) else x


class MMEngineMetaKDModel(BaseModel):
    """SR student trained with MetaKD (arXiv 2207.08356, reconstructed) inside mmengine's Runner.

    Args:
        student: the student network: a config for ``MODELS`` (or a BasicSR arch type) or a module.
            Saved as ``student.*`` in checkpoints; ``val_step`` / ``test_step`` run it alone.
        teacher: the teacher network (config or module); frozen, never saved, never DDP-wrapped.
        pairs: ``[(teacher_module_name, student_module_name), ...]``.
        teacher_ckpt: path of the trained teacher's weights (``None``: keep its initialisation,
            only for smoke tests). ``teacher_param_key``: key inside it (``params`` for BasicSR,
            ``state_dict`` for mmengine; ``None`` for a bare state dict). ``strict_load_teacher``.
            ``teacher_prefix``: keep and strip keys with this prefix (``'generator.'`` for MMagic).
        network_kr, texture_opt, output_kd_opt, pixel_opt, meta, upcycle_opt: as :func:`krdistill.build.build_metakd`
            (same names and defaults as BasicSR's YAML). Loss types the API does not know are
            built from ``MODELS``.
        data_preprocessor, init_cfg: as ``BaseModel``.

    The KRNets' optimizer is ``optim_wrapper.krnets`` (see :class:`MetaKDOptimWrapperConstructor`),
    not ``optim_kr``.
    """

    def __init__(self, student, teacher, pairs: Sequence[Sequence[str]], teacher_ckpt: str | None = None,
                 teacher_param_key: str | None = 'params', strict_load_teacher: bool = True,
                 teacher_prefix: str | None = None,
                 network_kr: Mapping | None = None, texture_opt: Mapping | None = None,
                 output_kd_opt: Mapping | None = None, pixel_opt: Mapping | None = None,
                 meta: Mapping | None = None, upcycle_opt: Mapping | None = None, data_preprocessor=None,
                 init_cfg=None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.student = build_sr_network(student, 'model.student')
        teacher = build_sr_network(teacher, 'model.teacher')
        if teacher_ckpt:
            # the one teacher loader of every front end (krdistill.io.load_weights), keys named as in this config
            load_weights(teacher, teacher_ckpt, teacher_param_key, strict_load_teacher, teacher_prefix,
                         key='model.teacher_ckpt', key_param='model.teacher_param_key',
                         key_strict='model.strict_load_teacher', safe_globals=CHECKPOINT_GLOBALS)
        # Not a sub-module: never saved, never in an optimizer, never wrapped (moved by _apply).
        object.__setattr__(self, 'teacher', freeze_teacher(teacher))
        pairs = [tuple(p) for p in pairs]
        for i, p in enumerate(pairs):
            if len(p) != 2 or not all(isinstance(n, str) for n in p):
                raise TypeError(f'model.pairs[{i}]: expected (teacher_module_name, student_module_name), got {p!r}')
        keys = dict(teacher_layers='model.pairs (teacher module names)',
                    student_layers='model.pairs (student module names)', network_kr='model.network_kr',
                    texture_opt='model.texture_opt', output_kd_opt='model.output_kd_opt', pixel_opt='model.pixel_opt',
                    meta='model.meta', upcycle_opt='model.upcycle_opt')
        self.mkd = build_metakd(self.teacher, self.student, [p[0] for p in pairs], [p[1] for p in pairs],
                                network_kr=network_kr, texture_opt=texture_opt, output_kd_opt=output_kd_opt,
                                pixel_opt=pixel_opt, meta=meta, resolve=resolve, keys=keys, upcycle_opt=upcycle_opt)
        self.krnets = self.mkd.krnets  # a sub-module: saved as krnets.*, stepped by optim_wrapper.krnets

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        self.mkd._apply(fn, *args, **kwargs)  # losses with buffers, if any (KRNets: already done)
        return self

    # ------------------------------------------------------------------ forward / steps
    @staticmethod
    def _unpack(data: Mapping):
        if not isinstance(data, Mapping) or 'lq' not in data:
            raise KeyError(f'MMEngineMetaKDModel: a batch must be a mapping with "lq" (and "gt" for training), '
                           f'got {type(data).__name__} {sorted(data) if isinstance(data, Mapping) else ""}')
        return _stack(data['lq']), (_stack(data['gt']) if data.get('gt') is not None else None)

    def forward(self, lq: torch.Tensor, gt: torch.Tensor | None = None, mode: str = 'tensor', **kwargs):
        """``mode='tensor'``: the student's output; ``'predict'``: a list of ``{'pred', 'gt'}`` per
        sample (for metrics); ``'loss'`` (eval mode only): the student objective's terms, no update."""
        lq = _stack(lq)
        gt = _stack(gt) if gt is not None else None
        if mode == 'tensor':
            return self.student(lq)
        if mode == 'predict':
            sr = self.student(lq)
            return [dict(pred=sr[i], gt=(gt[i] if gt is not None else None)) for i in range(sr.shape[0])]
        if mode == 'loss':
            if self.training:
                # Only a wrapper that bypasses train_step (mmengine's default MMDistributedDataParallel)
                # gets here while training: it would train the student without any meta update.
                raise RuntimeError('MMEngineMetaKDModel trains through its own train_step; for multi-GPU set '
                                   "model_wrapper_cfg=dict(type='MMSeparateDistributedDataParallel')")
            if gt is None:
                raise ValueError('MMEngineMetaKDModel: mode="loss" needs gt')
            total, terms, _ = self.mkd.loss(lq, gt)
            return dict(terms)
        raise ValueError(f'MMEngineMetaKDModel: mode must be tensor, predict or loss, got {mode!r}')

    def train_step(self, data, optim_wrapper) -> dict:
        """One MetaKD iteration: meta update of the KRNets (every ``meta.every`` iterations, on the
        previous batch), then the student step through ``optim_wrapper.student``."""
        if not isinstance(optim_wrapper, OptimWrapperDict) or any(k not in optim_wrapper for k in _OPTIM_KEYS):
            raise TypeError(f'MMEngineMetaKDModel needs an OptimWrapperDict with keys {list(_OPTIM_KEYS)}, got '
                            f'{type(optim_wrapper).__name__}; use {_OPTIM_EXAMPLE}')
        data = self.data_preprocessor(data, True)
        lq, gt = self._unpack(data)
        if gt is None:
            raise KeyError('MMEngineMetaKDModel: a training batch needs "gt"')
        ow_s = optim_wrapper['student']
        if self.mkd.student is not self.student:
            # MMSeparateDistributedDataParallel replaced the sub-module by its DDP wrapper: the
            # student step must go through it (hooks and the meta step use the bare module anyway).
            self.mkd.set_student(self.student)
        with ow_s.optim_context(self):
            step = self.mkd.train_step(lq, gt, ow_s, optim_wrapper['krnets'])
        if step.skipped is not None:
            from mmengine.logging import print_log
            print_log(f'MetaKD: {step.skipped}; step skipped', logger='current', level=30)
        logs = step.logs
        out = OrderedDict(loss=logs.pop('l_total'))
        out.update(logs)
        return out

    # ------------------------------------------------------------------ checkpoint
    def get_extra_state(self) -> dict:
        """The meta fallback state (call counter, last batch), saved as ``_extra_state``."""
        return self.mkd.meta_state_dict()

    def set_extra_state(self, state) -> None:
        if state:
            self.mkd.load_meta_state_dict(state)


class MetaKDOptimWrapperConstructor:
    """Build ``OptimWrapperDict(student=..., krnets=...)`` for :class:`MMEngineMetaKDModel`.

    Config::

        optim_wrapper = dict(
            constructor='MetaKDOptimWrapperConstructor',
            student=dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=2e-4, betas=(0.9, 0.99)),
                         clip_grad=None),
            krnets=dict(optimizer=dict(type='Adam', lr=1e-4, betas=(0.9, 0.999))))

    Each entry is an ordinary single-optimizer ``optim_wrapper`` config (``type`` defaults to
    ``OptimWrapper``; ``paramwise_cfg`` allowed inside) built by ``DefaultOptimWrapperConstructor``
    on ``model.student`` / ``model.krnets``. Without ``krnets`` the student's settings are used (as
    BasicSR's ``optim_kr`` falls back on ``optim_g``).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        if paramwise_cfg is not None:
            raise ValueError('optim_wrapper.paramwise_cfg: put it inside optim_wrapper.student / optim_wrapper.krnets')
        cfg = dict(optim_wrapper_cfg)
        unknown = sorted(set(cfg) - set(_OPTIM_KEYS))
        if unknown or 'student' not in cfg:
            raise KeyError(f'optim_wrapper: MetaKDOptimWrapperConstructor takes keys {list(_OPTIM_KEYS)} '
                           f'(got {sorted(cfg)}); e.g. {_OPTIM_EXAMPLE}')
        self.cfgs = {k: copy.deepcopy(cfg.get(k, cfg['student'])) for k in _OPTIM_KEYS}

    def __call__(self, model: nn.Module) -> OptimWrapperDict:
        if is_model_wrapper(model):
            model = model.module
        wrappers = {}
        for name, cfg in self.cfgs.items():
            cfg = copy.deepcopy(cfg)
            cfg.setdefault('type', 'OptimWrapper')
            paramwise = cfg.pop('paramwise_cfg', None)
            if not hasattr(model, name):
                raise AttributeError(f'optim_wrapper.{name}: the model has no sub-module {name!r}')
            wrappers[name] = DefaultOptimWrapperConstructor(cfg, paramwise)(getattr(model, name))
        return OptimWrapperDict(**wrappers)
