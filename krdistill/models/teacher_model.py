"""The shared base of krdistill's BasicSR models: a frozen teacher, the distillation points, the
non-finite policy, safe checkpoints and exact resume. Not registered; ``KDSRModel`` and
``MetaKDModel`` are its thin, registered subclasses.

The algorithm (objective, meta step, iteration) is not here: it is the framework-free
:class:`~krdistill.distiller.Distiller` / :class:`~krdistill.metakd.MetaKD`, built by
:mod:`krdistill.build` from the option blocks and run once per iteration by
:meth:`optimize_parameters`. This class adds what BasicSR owns: options, optimizers, schedulers,
logging, checkpoints.

YAML (see ``options/``)::

    network_g: {type: EDSR, num_feat: 64, num_block: 16, upscale: 4, ...}   # student
    network_t: {type: EDSR, num_feat: 256, num_block: 32, upscale: 4, res_scale: 0.1, ...}
    path:
      pretrain_network_t: experiments/pretrained_models/EDSR_Lx4.pth
      param_key_t: params
      strict_load_t: true
      ignore_resume_networks: [network_t]     # the teacher is never saved: keep its path on resume
    kd: {teacher_layers: [body.31], student_layers: [body.15]}
    train:
      max_nonfinite: 10   # skipped iterations in a row before training stops

Before BasicSR builds anything, every key of the top level, ``train``, ``path``, ``network_g`` and
``network_t`` must be known (``option_keys``, which subclasses extend; :mod:`krdistill.option_checks`)
and the networks' channels must be the data's; the other blocks are checked where they are read.
Every run then makes one dummy forward of teacher and student (:meth:`_probe`: scale, output
channels, the distillation points), and a ``KDSRModel`` needs a KD term.

The teacher is built with BasicSR's ``build_network`` (its registry name resolution), loaded with
``weights_only=True``, frozen (``eval``, ``requires_grad_(False)``), run under ``no_grad``, never
DDP-wrapped and never saved. At inference (``is_train: false``) the model is a plain ``SRModel``.
"""
from __future__ import annotations

import glob
import os
import shutil
from collections import OrderedDict
from copy import deepcopy
from os import path as osp

import torch
from basicsr.archs import build_network
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY

from .. import resume as exact_resume
from ..build import BASICSR_KEYS, OPTIMIZERS, build_optimizer, probe_pairs
from ..io import (CheckpointError, check_finite, load_checkpoint, load_weights, nonfinite_tensors, save_checkpoint,
                  state_dict_from, strip_prefix, write_error_cause)
from ..metakd import check_number
from ..option_checks import (BASICSR_TOP_KEYS, BASICSR_TRAIN_KEYS, check_keys, check_option_keys, check_run_options,
                             signature_keys)

__all__ = ['TeacherStudentModel', 'load_teacher', 'extend_keys', 'check_arch_keys']

KD_KEYS = ('teacher_layers', 'student_layers')


def extend_keys(option_keys: dict, **blocks) -> dict:
    """``option_keys`` of a subclass: the base's plus more keys per block (``top=`` for the top level,
    ``train=`` for ``train:``)."""
    out = {k: tuple(v) for k, v in option_keys.items()}
    for block, keys in blocks.items():
        name = '' if block == 'top' else block
        out[name] = out.get(name, ()) + tuple(keys)
    return out


def load_teacher(net: torch.nn.Module, path_opt: dict, resuming: bool = False, resume_iter=None,
                 models_dir: str | None = None) -> None:
    """Load ``path.pretrain_network_t`` into ``net``; errors name the key to fix."""
    load_path = path_opt.get('pretrain_network_t')
    if not load_path:
        raise ValueError('path.pretrain_network_t is required: the trained teacher checkpoint '
                         '(a BasicSR .pth with a "params" or "params_ema" entry)')
    if resuming and models_dir and osp.normpath(load_path) == osp.normpath(
            osp.join(models_dir, f'net_t_{resume_iter}.pth')) and not osp.isfile(load_path):
        raise ValueError('path.ignore_resume_networks: list network_t there. On resume BasicSR points every '
                         f'network_* at models/net_<x>_<iter>.pth ({load_path}), but a teacher is never saved.')
    param_key = path_opt.get('param_key_t', 'params')
    if resuming and param_key == 'params':
        # BasicSR's check_resume turns every param_key_* 'params_ema' into 'params' on resume
        ckpt = load_checkpoint(load_path, 'path.pretrain_network_t')
        if isinstance(ckpt, dict) and 'params' not in ckpt and 'params_ema' in ckpt:
            param_key = 'params_ema'
    report = load_weights(net, load_path, param_key, bool(path_opt.get('strict_load_t', True)),
                          log=get_root_logger().warning)
    get_root_logger().info(f'Teacher loaded from {load_path} ({len(report["loaded"])} tensors, key {param_key!r})')


def check_arch_keys(net_opt, key: str) -> None:
    """The keys of a ``network_*`` block are ``type`` and the arguments of its registered arch (an
    unknown type, or an arch taking ``**kwargs``, is left to ``build_network``)."""
    if not isinstance(net_opt, dict) or not isinstance(net_opt.get('type'), str):
        return
    try:
        cls = ARCH_REGISTRY.get(net_opt['type'])  # BasicSR's own name resolution
    except KeyError:
        return
    known = signature_keys(cls)
    if known is not None:
        check_keys(net_opt, ('type', *known), key)


class TeacherStudentModel(SRModel):
    """``SRModel`` with a frozen teacher and a distillation algorithm (a subclass builds it)."""

    #: keys allowed in the ``kd:`` block
    kd_keys = KD_KEYS
    #: the keys an option file of this model may hold: ``''`` the top level, ``train`` its ``train:``
    #: block (``path:`` follows from the ``network_<x>`` keys). A subclass extends them with
    #: :func:`extend_keys`; everything else is refused before the networks are built.
    option_keys = {'': BASICSR_TOP_KEYS + ('network_t', 'kd'),
                   'train': BASICSR_TRAIN_KEYS + ('max_nonfinite', 'output_kd_opt', 'kd_opt', 'optim_kd',
                                                  'upcycle_opt')}

    def __init__(self, opt):
        check_option_keys(opt, self.option_keys)  # before BasicSR builds or loads anything
        for key in ('network_g', 'network_t'):
            check_arch_keys(opt.get(key), key)
        if opt.get('is_train'):
            self._check_channel_options(opt)
            check_run_options(opt)
        super().__init__(opt)

    # ----------------------------------------------------------------- building
    def init_training_settings(self):
        self._build_teacher()
        self.kd_opt = self._kd_block()
        self.kd_shapes = self._probe()  # every run: scale and channels, and the distillation points
        self.distiller = self.build_algorithm()
        self.distiller.broadcast_parameters()  # same training-only initialisation on every rank
        self._load_training_only_networks()
        self.max_nonfinite = check_number(self.opt['train'].get('max_nonfinite', 10), 'train.max_nonfinite',
                                          minimum=1, integer=True)
        self._nonfinite = 0
        super().init_training_settings()

    def build_algorithm(self):
        """The :class:`~krdistill.distiller.Distiller` (or subclass) this model runs."""
        raise NotImplementedError

    def _build_teacher(self) -> None:
        if 'network_t' not in self.opt:
            raise KeyError(f'network_t: {self.opt["model_type"]} needs a teacher network block')
        t_opt = deepcopy(self.opt['network_t'])
        if not isinstance(t_opt, dict) or 'type' not in t_opt:
            raise KeyError('network_t.type: required (a registered arch, e.g. EDSR)')
        try:
            net = build_network(t_opt)  # BasicSR's own name resolution (e.g. the _basicsr suffix)
        except KeyError as e:
            raise KeyError(f'network_t.type: {self.opt["network_t"]["type"]!r} is not a registered arch ({e})') from e
        except TypeError as e:
            raise TypeError(f'network_t: cannot build {self.opt["network_t"]["type"]}: {e}') from e
        self.net_t = net.to(self.device)  # never model_to_device: the teacher is not DDP-wrapped
        resume = self.opt['path'].get('resume_state')
        load_teacher(self.net_t, self.opt['path'], resuming=bool(resume),
                     resume_iter=osp.splitext(osp.basename(resume))[0] if resume else None,
                     models_dir=self.opt['path'].get('models'))
        self.net_t.eval().requires_grad_(False)

    def _kd_block(self) -> dict:
        kd = deepcopy(self.opt.get('kd') or {})
        if kd == 'auto':
            kd = {'auto': True}
        if not isinstance(kd, dict):
            raise TypeError(f'kd: must be "auto" or a mapping with keys {list(self.kd_keys) + ["auto", "points"]}, '
                            f'got {kd!r}')
        if kd.get('auto'):
            return self._auto_kd_block(kd)
        check_keys(kd, (*self.kd_keys, 'auto', 'points'), 'kd')
        if 'points' in kd:
            raise KeyError('kd.points: only with kd.auto: true (or give kd.teacher_layers / kd.student_layers)')
        for key in ('teacher_layers', 'student_layers'):
            value = kd.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f'kd.{key}: must be a list of module names, got {value!r}')
            kd[key] = list(value)
        if len(kd['teacher_layers']) != len(kd['student_layers']):
            raise ValueError(f'kd.teacher_layers ({len(kd["teacher_layers"])} names) and kd.student_layers '
                             f'({len(kd["student_layers"])} names) must pair up one to one')
        return kd

    def _auto_kd_block(self, kd: dict) -> dict:
        """``kd: auto`` / ``{auto: true, points: N}``: points paired by relative depth along the bodies
        (:func:`krdistill.pairing.auto_pairs`); names given as well override the choice."""
        from ..pairing import auto_pairs, format_pairs
        check_keys(kd, ('auto', 'points', *self.kd_keys), 'kd')
        if kd.get('teacher_layers') or kd.get('student_layers'):
            raise KeyError('kd: give either kd.auto or kd.teacher_layers / kd.student_layers, not both')
        points = check_number(kd.get('points', 1), 'kd.points', minimum=1, integer=True)
        in_ch = self.opt['network_g'].get('num_in_ch', 3)
        lq = torch.rand(1, in_ch, 16, 16, generator=torch.Generator().manual_seed(0)).to(self.device)
        pairs = auto_pairs(self.net_t, self.net_g, points, lq)
        get_root_logger().info(f'kd: auto chose {len(pairs)} distillation point(s) (teacher -> student):\n'
                               f'{format_pairs(pairs)}')
        return dict(teacher_layers=[p[0] for p in pairs], student_layers=[p[1] for p in pairs])

    @staticmethod
    def data_channels(opt: dict) -> tuple[int, str]:
        """The channels of the training images and why: 1 with ``datasets.train.color: y``, else 3
        (BasicSR reads every image as BGR)."""
        train_ds = (opt.get('datasets') or {}).get('train') or {}
        if train_ds.get('color') == 'y':
            return 1, 'datasets.train.color: y'
        return 3, 'BasicSR reads the images as 3-channel BGR; datasets.train.color: y for 1 channel'

    def _check_channel_options(self, opt: dict) -> None:
        """``num_in_ch`` / ``num_out_ch`` of student and teacher, where given, are the data's channels
        (an arch may broadcast a wrong count silently, e.g. EDSR's mean)."""
        channels, why = self.data_channels(opt)
        for key in ('network_g', 'network_t'):
            net_opt = opt.get(key)
            for ch_key in ('num_in_ch', 'num_out_ch'):
                value = net_opt.get(ch_key) if isinstance(net_opt, dict) else None
                if value is not None and value != channels:
                    raise ValueError(f'{key}.{ch_key}: {value}, but the training images have {channels} channel(s) '
                                     f'({why}); set {key}.{ch_key}: {channels}')

    def _probe(self) -> dict:
        """One dummy forward of teacher and student on a tiny LR input shaped like the data, for every
        run: the scales agree with each other and with ``scale``, both give images with the data's
        channels, and the distillation points exist (their channels are read)."""
        channels, where = self.data_channels(self.opt)
        lq = torch.rand(1, channels, 16, 16, generator=torch.Generator().manual_seed(0)).to(self.device)
        try:
            shapes = probe_pairs(self.net_t, self.net_g, self.kd_opt['teacher_layers'],
                                 self.kd_opt['student_layers'], lq, keys=BASICSR_KEYS)
        except ValueError as e:
            if 'scale mismatch' in str(e):
                raise ValueError(f'{e}; set network_t.upscale / network_g.upscale to match scale') from e
            raise
        scale = self.opt.get('scale')
        if scale is not None and shapes['scale'] != scale:
            raise ValueError(f'scale mismatch: the networks upscale x{shapes["scale"]}, option scale is x{scale}; '
                             'set network_t.upscale / network_g.upscale to match scale')
        if shapes['channels'] != channels:
            raise ValueError(f'network_g.num_out_ch: the student gives {shapes["channels"]}-channel images, but the '
                             f'training images have {channels} channel(s) ({where}); set network_g.num_out_ch and '
                             f'network_t.num_out_ch to {channels}')
        return shapes

    def pixel_terms(self, sr, gt) -> OrderedDict:
        """BasicSR's reconstruction terms (``train.pixel_opt`` and ``train.perceptual_opt``)."""
        terms = OrderedDict()
        if self.cri_pix:
            terms['l_pix'] = self.cri_pix(sr, gt)
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(sr, gt)
            if l_percep is not None:
                terms['l_percep'] = l_percep
            if l_style is not None:
                terms['l_style'] = l_style
        return terms

    def model_to_device(self, net):
        """BasicSR's ``model_to_device``, plus DDP on CPU (gloo; no ``device_ids``)."""
        if self.opt['dist'] and self.device.type == 'cpu':
            from torch.nn.parallel import DistributedDataParallel
            return DistributedDataParallel(net.to(self.device), find_unused_parameters=self.opt.get(
                'find_unused_parameters', False))
        return super().model_to_device(net)

    def setup_optimizers(self):
        train_opt = self.opt['train']
        groups = [{'params': [p for p in self.net_g.parameters() if p.requires_grad]}]
        kd_params = self.distiller.kd_parameters()
        overrides = train_opt.get('optim_kd') or {}
        g_type = train_opt['optim_g'].get('type') if isinstance(train_opt.get('optim_g'), dict) else None
        known = signature_keys(OPTIMIZERS[g_type], skip=('self', 'params')) if g_type in OPTIMIZERS else None
        if known is not None:
            check_keys(overrides, known, 'train.optim_kd')  # overrides of train.optim_g's settings
        if overrides and not kd_params:
            raise ValueError('train.optim_kd: sets the optimizer of the KD regressors (a train.kd_opt term with '
                             'parameters, e.g. FitNetLoss), but this run has none; remove train.optim_kd or set '
                             'train.kd_opt')
        if kd_params:
            group = {'params': kd_params}
            group.update(deepcopy(overrides))  # optional overrides, e.g. lr
            if 'lr' in group:
                check_number(group['lr'], 'train.optim_kd.lr', minimum=0)
            groups.append(group)
        if not isinstance(train_opt.get('optim_g'), dict):
            raise KeyError('train.optim_g: required, e.g. {type: Adam, lr: 2.0e-4, betas: [0.9, 0.99]}')
        self.optimizer_g = build_optimizer(train_opt['optim_g'], groups, 'train.optim_g')
        self.optimizers.append(self.optimizer_g)

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        return build_optimizer(dict(kwargs, type=optim_type, lr=lr), params, 'train.optim_*')

    # ----------------------------------------------------------------- training
    def step_target(self):
        """The ground truth of the student's reconstruction terms (``self.gt``; the Real-ESRGAN models
        may use the USM-sharpened GT, see :mod:`krdistill.models.gan_kd_model`)."""
        return self.gt

    def run_iteration(self, current_iter: int):
        """One iteration of the algorithm; returns its :class:`~krdistill.distiller.StepResult`."""
        raise NotImplementedError

    def optimize_parameters(self, current_iter):
        step = self.run_iteration(current_iter)
        self.output = step.output
        logs = OrderedDict((k, v) for k, v in step.logs.items() if k != 'l_total')
        if step.skipped is None:
            self._nonfinite = 0
        else:
            self._skip(current_iter, step.skipped)
        self.log_dict = self.reduce_loss_dict(logs)
        if self.ema_decay > 0 and step.skipped is None:
            self.model_ema(decay=self.ema_decay)

    def _skip(self, current_iter: int, why: str) -> None:
        """Count a skipped iteration; stop after ``train.max_nonfinite`` in a row, saving the last
        good state (skipped steps change nothing) when it is finite."""
        self._nonfinite += 1
        logger = get_root_logger()
        logger.warning(f'iter {current_iter}: {why}; step skipped ({self._nonfinite} in a row, limit '
                       f'train.max_nonfinite={self.max_nonfinite})')
        if self._nonfinite < self.max_nonfinite:
            return
        bad = self.nonfinite_state()
        if not bad:
            self.save(epoch=-1, current_iter=current_iter)
            where = (f'the last good state was saved as iteration {current_iter} in {self.opt["path"]["models"]} '
                     '(krdistill-train --auto_resume continues from it)')
        else:
            where = f'the weights themselves are not finite ({bad[:3]}), so nothing was saved; {self.last_good_state()}'
        raise FloatingPointError(
            f'Training stopped at iter {current_iter}: {self._nonfinite} iterations in a row skipped on non-finite '
            f'values (last: {why}); {where}. Lower train.optim_g.lr or the loss weights, or check the data.')

    # ----------------------------------------------------------------- saving
    def training_only_networks(self) -> dict:
        """Label -> module of the trainable, training-only networks saved beside ``net_g``."""
        return {'kd': self.distiller} if len(list(self.distiller.parameters())) > 0 else {}

    def saved_tensors(self):
        """``(name, tensor)`` of everything a checkpoint holds: networks and optimizer states."""
        nets = {'net_g': self.get_bare_model(self.net_g)}
        if hasattr(self, 'net_g_ema'):
            nets['net_g_ema'] = self.get_bare_model(self.net_g_ema)
        if self.is_train:
            nets.update((f'net_{k}', v) for k, v in self.training_only_networks().items())
        for label, net in nets.items():
            for name, t in net.state_dict().items():
                yield f'{label}.{name}', t
        for i, o in enumerate(self.optimizers):
            for pid, st in o.state.items():
                for name, t in st.items():
                    if torch.is_tensor(t):
                        yield f'optimizers[{i}].state.{name}', t

    def nonfinite_state(self) -> list[str]:
        """Names of saved tensors that are not finite (empty when the state is good)."""
        return [n for n, t in self.saved_tensors() if t.is_floating_point() and not bool(torch.isfinite(t).all())]

    def save(self, epoch, current_iter):
        """Save student, training-only networks and the training state, crash-safe.

        Refuses to write a checkpoint holding any non-finite tensor (networks or optimizer states).
        Files are written into hidden ``.tmp_<iter>`` folders and then moved into place with
        ``os.replace``, networks first and the training state last, so a kill during saving never
        leaves a truncated file that ``--auto_resume`` would pick up.
        """
        bad = self.nonfinite_state()
        if bad:
            raise FloatingPointError(f'refusing to save a checkpoint with non-finite tensors ({bad[:3]} ...) at iter '
                                     f'{current_iter}; {self.last_good_state()}')
        if current_iter != -1:  # the final 'latest' save writes no training state: no collective at shutdown
            self._extra_states = self._gather_extra_states()  # every rank takes part; rank 0 writes them
            bad = nonfinite_tensors(self._extra_states, 'krdistill.ranks')
            if bad:
                raise FloatingPointError(f'refusing to save a training state with non-finite tensors ({bad[:3]}) at '
                                         f'iter {current_iter}; {self.last_good_state()}')
        if self.opt.get('rank', 0) != 0:
            return  # BasicSR saves on the master rank only
        paths = self.opt['path']
        final = {k: paths[k] for k in ('models', 'training_states')}
        tmp = {k: osp.join(v, f'.tmp_{current_iter}') for k, v in final.items()}
        try:
            for k, d in tmp.items():
                for stale in glob.glob(osp.join(final[k], '.tmp_*')):  # left by a killed save
                    shutil.rmtree(stale, ignore_errors=True)
                os.makedirs(d)
            paths.update(tmp)
            try:
                if self.is_train:
                    for label, net in self.training_only_networks().items():
                        self.save_network(net, f'net_{label}', current_iter)
                super().save(epoch, current_iter)
            finally:
                paths.update(final)
            for k in ('models', 'training_states'):  # the training state (what resume looks for) last
                for name in sorted(os.listdir(tmp[k])):
                    os.replace(osp.join(tmp[k], name), osp.join(final[k], name))
                os.rmdir(tmp[k])
        except (OSError, CheckpointError) as e:
            for d in tmp.values():
                shutil.rmtree(d, ignore_errors=True)
            if isinstance(e, CheckpointError):
                detail = str(e)
            else:
                folder = osp.dirname(getattr(e, 'filename', None) or final['models'])
                detail = f'cannot write {getattr(e, "filename", None) or folder}: {write_error_cause(e, folder)}'
            raise CheckpointError(f'saving iteration {current_iter} failed ({detail}). No training state of '
                                  f'iteration {current_iter} was written (resume never picks a half-saved iteration) '
                                  f'and no earlier checkpoint was changed; {self.last_good_state()}') from e

    def last_good_state(self) -> str:
        """Where the run's last good state is, in words: the newest training state on disk, or none."""
        folder = self.opt['path'].get('training_states')
        iters = sorted(int(osp.splitext(n)[0]) for n in (os.listdir(folder) if folder and osp.isdir(folder) else [])
                       if n.endswith('.state') and osp.splitext(n)[0].isdigit())
        if iters:
            return (f'the last good state on disk is iteration {iters[-1]} ({osp.join(folder, f"{iters[-1]}.state")}); '
                    'krdistill-train --auto_resume continues from it')
        return (f'this run has saved no checkpoint yet (no training state in {folder}), so there is no good state '
                'to resume from: start the run again')

    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's ``save_network`` (same file, same ``{param_key: state_dict}`` content), but a failed
        write raises :class:`krdistill.io.CheckpointError` naming the file and the cause (a full or
        read-only disk). BasicSR 1.4.2 retries three times and then goes on without the file, which
        would leave an iteration without its ``net_g`` beside a training state that points to it."""
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError('save_network: the lengths of net and param_key should be the same')
        save = {k: OrderedDict((n[7:] if n.startswith('module.') else n, t.cpu())
                               for n, t in self.get_bare_model(n_).state_dict().items()) for n_, k in zip(nets, keys)}
        name = f'{net_label}_{"latest" if current_iter == -1 else current_iter}.pth'
        save_checkpoint(save, osp.join(self.opt['path']['models'], name), 'path.models')

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's ``load_network`` (``path.pretrain_network_g``, and ``models/net_g_<iter>.pth`` on
        resume) through :mod:`krdistill.io`: ``weights_only=True``, errors naming the file and the option
        key (missing, truncated, pickled), and a state holding a non-finite tensor refused. Otherwise
        BasicSR's behaviour: ``params_ema`` falls back to ``params``, ``strict_load_g: false`` loads
        what matches."""
        logger = get_root_logger()
        key = self._option_key_of(load_path)
        ckpt = load_checkpoint(load_path, key)
        if param_key is not None and isinstance(ckpt, dict) and param_key not in ckpt and 'params' in ckpt:
            param_key = 'params'
            logger.info('Loading: params_ema does not exist, use params.')
        state = strip_prefix(state_dict_from(ckpt, param_key, str(load_path), key.split(' ')[0].replace(
            'pretrain_network_', 'param_key_')))
        check_finite(state, load_path, key, prefix=param_key or '')
        net = self.get_bare_model(net)
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        self._print_different_keys_loading(net, state, strict)
        try:
            net.load_state_dict(state, strict=strict)
        except RuntimeError as e:
            raise RuntimeError(f'{key}: {load_path} does not match the network ({str(e)[:500]})') from None

    def _option_key_of(self, load_path) -> str:
        """The ``path.pretrain_network_*`` option that names ``load_path`` (and the training state that
        set it on resume), for messages."""
        p = self.opt['path']
        key = next((f'path.{k}' for k, v in p.items() if k.startswith('pretrain_network_') and v
                    and osp.normpath(str(v)) == osp.normpath(str(load_path))), 'checkpoint')
        if p.get('resume_state') and p.get('models') and \
                osp.normpath(osp.dirname(str(load_path))) == osp.normpath(p['models']):
            key += f' (set by resuming from {p["resume_state"]})'
        return key

    # ----------------------------------------------------------------- exact resume
    def extra_training_state(self) -> dict:
        """What this rank adds to the training state besides optimizers and schedulers: its
        random generator states (see ``krdistill/resume.py``). Subclasses extend it."""
        return {'rng': exact_resume.rng_state()}

    def _gather_extra_states(self) -> list:
        state = self.extra_training_state()
        if self.opt.get('dist') and torch.distributed.is_available() and torch.distributed.is_initialized():
            state = _to_cpu(state)
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
            return states
        return [state]

    def save_training_state(self, epoch, current_iter):
        """BasicSR's training state (epoch, iter, optimizers, schedulers) plus ``krdistill``: one
        :meth:`extra_training_state` per rank; plain containers and tensors only, so it loads
        with ``weights_only=True``. Errors are raised, not retried and ignored."""
        if current_iter == -1:
            return
        extra = getattr(self, '_extra_states', None) or [self.extra_training_state()]
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers], 'krdistill': {'ranks': extra}}
        save_checkpoint(exact_resume.plain_state(state),
                        osp.join(self.opt['path']['training_states'], f'{current_iter}.state'), 'path.training_states')

    def resume_training(self, resume_state):
        """Optimizers and schedulers (BasicSR), then this rank's :meth:`extra_training_state`."""
        super().resume_training(resume_state)
        ranks = (resume_state.get('krdistill') or {}).get('ranks') or []
        rank = self.opt.get('rank', 0)
        if len(ranks) != self.opt.get('world_size', 1):
            get_root_logger().warning(
                f'resume: the training state holds {len(ranks)} rank state(s) for world size '
                f'{self.opt.get("world_size", 1)} (written by another setup or an older krdistill); random '
                'states are not restored, so batches after the resume differ from an uninterrupted run.')
            return
        self.load_extra_training_state(ranks[rank])

    def load_extra_training_state(self, state: dict) -> None:
        """Restore :meth:`extra_training_state`. Python's and NumPy's generators at once (the next
        batch is augmented with them), torch's at the first :meth:`feed_data`."""
        exact_resume.restore_host_rng(state['rng'])
        self._pending_torch_rng = state['rng']

    def feed_data(self, data):
        pending = getattr(self, '_pending_torch_rng', None)
        if pending is not None:
            exact_resume.restore_torch_rng(pending)
            self._pending_torch_rng = None
        super().feed_data(data)

    def _load_training_only_networks(self) -> None:
        """On resume, load ``net_<label>_<iter>.pth`` written next to ``net_g_<iter>.pth``."""
        resume = self.opt['path'].get('resume_state')
        if not resume:
            return
        it = osp.splitext(osp.basename(resume))[0]
        for label, net in self.training_only_networks().items():
            load_path = osp.join(self.opt['path']['models'], f'net_{label}_{it}.pth')
            if not osp.isfile(load_path):
                raise FileNotFoundError(f'path.resume_state: {resume} has no net_{label} state {load_path} beside it')
            load_weights(net, load_path, 'params', True, key=f'net_{label} of path.resume_state',
                         key_param='params', key_strict='strict')
            get_root_logger().info(f'Resumed training-only network net_{label} from {load_path}')


def _to_cpu(obj):
    """``obj`` with every tensor moved to the CPU (for ``all_gather_object``)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
