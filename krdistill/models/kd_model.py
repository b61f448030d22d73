"""KDSRModel: BasicSR ``SRModel`` plus a frozen teacher and hand-crafted KD losses.

YAML (see ``options/``)::

    model_type: KDSRModel
    network_g: {type: EDSR, num_feat: 64, num_block: 16, upscale: 4, ...}   # student
    network_t: {type: EDSR, num_feat: 256, num_block: 32, upscale: 4, res_scale: 0.1, ...}
    path:
      pretrain_network_t: experiments/pretrained_models/EDSR/EDSR_Lx4_f256b32_DIV2K_official-76ee1c8f.pth
      param_key_t: params
      strict_load_t: true
    kd:
      teacher_layers: [body.31]
      student_layers: [body.15]
    train:
      pixel_opt: {type: L1Loss, loss_weight: 1.0}
      kd_opt: {type: FitNetLoss, loss_weight: 1.0}        # per distillation point (optional)
      output_kd_opt: {type: OutputKDLoss, loss_weight: 1.0} # on SR outputs (optional)

The teacher is built with ``build_network``, loaded, frozen (``eval``,
``requires_grad_(False)``), run under ``no_grad``, never DDP-wrapped and never saved. KD
parameters (FitNet regressors) are trained with the student's optimizer (a second param
group), saved as ``net_kd_<iter>.pth`` and restored on resume. At inference (``is_train:
false``) the model is a plain ``SRModel``: no teacher is built.
"""
from __future__ import annotations

import glob
import inspect
import os
import shutil
from collections import OrderedDict
from copy import deepcopy
from os import path as osp

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

from .. import resume as exact_resume
from ..distiller import Distiller, probe

KD_KEYS = ('teacher_layers', 'student_layers')


def _check_keys(block: dict, allowed, where: str) -> None:
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise KeyError(f'{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}')


def build_kd_loss(loss_opt: dict, key: str, **shape_kwargs):
    """``build_loss`` that passes ``s_channels``/``t_channels`` to classes accepting them and
    names the YAML key in errors."""
    loss_opt = deepcopy(loss_opt)
    loss_type = loss_opt.get('type')
    if loss_type is None or loss_type not in LOSS_REGISTRY:
        raise KeyError(f'{key}.type: {loss_type!r} is not a registered loss '
                       f'(e.g. {sorted(LOSS_REGISTRY._obj_map)[:12]} ...)')
    cls = LOSS_REGISTRY.get(loss_type)
    params = inspect.signature(cls.__init__).parameters
    for k, v in shape_kwargs.items():
        if k in params and k not in loss_opt:
            loss_opt[k] = v
    try:
        return build_loss(loss_opt)
    except TypeError as e:
        raise TypeError(f'{key}: cannot build {loss_type} from {loss_opt}: {e}') from e


def load_teacher_weights(net: torch.nn.Module, path_opt: dict) -> None:
    """Load ``path.pretrain_network_t`` into ``net`` with errors that name the key to fix."""
    load_path = path_opt.get('pretrain_network_t')
    if not load_path:
        raise ValueError('path.pretrain_network_t is required: the trained teacher checkpoint '
                         '(a BasicSR .pth with a "params" or "params_ema" entry)')
    if not osp.isfile(load_path):
        raise FileNotFoundError(f'path.pretrain_network_t: no such file: {load_path}')
    param_key = path_opt.get('param_key_t', 'params')
    strict = path_opt.get('strict_load_t', True)
    try:
        ckpt = torch.load(load_path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, pickle with code, ...)
        raise RuntimeError(f'path.pretrain_network_t: cannot load {load_path}: {e}') from e
    if param_key is not None:
        if not isinstance(ckpt, dict) or param_key not in ckpt:
            keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise KeyError(f'path.param_key_t: {param_key!r} is not in {load_path}; it holds {keys}')
        ckpt = ckpt[param_key]
    state = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in ckpt.items())
    try:
        net.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(f'network_t does not match path.pretrain_network_t ({load_path}); check network_t '
                           f'options or set path.strict_load_t: false. {e}') from e


@MODEL_REGISTRY.register()
class KDSRModel(SRModel):
    """SR model distilled from a frozen teacher (output KD, FitNet, AT, FAKD, ...)."""

    #: keys allowed in the ``kd:`` block (subclasses extend)
    kd_keys = KD_KEYS

    def init_training_settings(self):
        self._build_teacher()
        self._probe_networks()
        self._build_distiller()
        super().init_training_settings()

    # ----------------------------------------------------------------- building
    def _build_teacher(self) -> None:
        if 'network_t' not in self.opt:
            raise KeyError(f'network_t: {self.opt["model_type"]} needs a teacher network block')
        t_opt = self.opt['network_t']
        if t_opt.get('type') not in ARCH_REGISTRY:
            raise KeyError(f'network_t.type: {t_opt.get("type")!r} is not a registered arch')
        # never model_to_device: the teacher is not DDP-wrapped
        self.net_t = build_network(t_opt).to(self.device)
        load_teacher_weights(self.net_t, self.opt['path'])
        self.net_t.eval().requires_grad_(False)

    def _kd_block(self) -> dict:
        kd = self.opt.get('kd') or {}
        if not isinstance(kd, dict):
            raise TypeError(f'kd: must be a mapping with keys {list(self.kd_keys)}, got {type(kd).__name__}')
        _check_keys(kd, self.kd_keys, 'kd')
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

    def _probe_networks(self) -> None:
        """One dummy forward of each network: module names exist, scales agree, channels known."""
        self.kd_opt = self._kd_block()
        in_ch = self.opt['network_g'].get('num_in_ch', 3)
        lq = torch.rand(1, in_ch, 16, 16, device=self.device)
        out_t, shapes_t = probe(self.net_t, self.kd_opt['teacher_layers'], lq, key='kd.teacher_layers')
        out_s, shapes_s = probe(self.net_g, self.kd_opt['student_layers'], lq, key='kd.student_layers')
        scale = self.opt.get('scale')
        scale_t, scale_s = out_t[-1] // lq.shape[-1], out_s[-1] // lq.shape[-1]
        if scale_t != scale_s or (scale is not None and scale_s != scale):
            raise ValueError(f'scale mismatch: teacher (network_t) upscales x{scale_t}, student (network_g) '
                             f'x{scale_s}, option scale is x{scale}; set network_t.upscale / network_g.upscale '
                             'to match scale')
        self.kd_shapes = dict(teacher=shapes_t, student=shapes_s)

    def build_pair_losses(self) -> list:
        """One loss module per distillation point from ``train.kd_opt`` (empty if absent)."""
        loss_opt = self.opt['train'].get('kd_opt')
        if not loss_opt:
            return []
        return [
            build_kd_loss(loss_opt, 'train.kd_opt', s_channels=ss[1], t_channels=ts[1])
            for ss, ts in zip(self.kd_shapes['student'], self.kd_shapes['teacher'])
        ]

    def _build_distiller(self) -> None:
        train_opt = self.opt['train']
        out_opt = train_opt.get('output_kd_opt')
        output_loss = build_kd_loss(out_opt, 'train.output_kd_opt') if out_opt else None
        pair_losses = self.build_pair_losses()
        if pair_losses and not self.kd_opt['student_layers']:
            raise ValueError('train.kd_opt is set but kd.student_layers / kd.teacher_layers are empty')
        # record features only when a per-point loss uses them
        t_layers, s_layers = ((self.kd_opt['teacher_layers'], self.kd_opt['student_layers']) if pair_losses else
                              ([], []))
        self.distiller = Distiller(
            self.net_t, self.net_g, t_layers, s_layers,
            pair_losses=pair_losses, output_loss=output_loss,
            keys=dict(teacher_layers='kd.teacher_layers', student_layers='kd.student_layers')).to(self.device)
        self.net_kd = self.distiller  # its state_dict is exactly the trainable KD state
        self.sync_training_only()
        self._load_kd_state()

    def model_to_device(self, net):
        """BasicSR's ``model_to_device``, plus DDP on CPU (gloo; no ``device_ids``)."""
        if self.opt['dist'] and self.device.type == 'cpu':
            from torch.nn.parallel import DistributedDataParallel
            return DistributedDataParallel(net.to(self.device), find_unused_parameters=self.opt.get(
                'find_unused_parameters', False))
        return super().model_to_device(net)

    def sync_training_only(self, grads: bool = False) -> None:
        """Under DDP: broadcast the training-only KD parameters from rank 0 (``grads=False``, at
        start) or average their gradients over ranks (``grads=True``, before a step). The student
        is synchronised by DDP itself; regressors and KRNets are not inside it."""
        if not self.opt.get('dist') or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for p in self.distiller.parameters():
            if not grads:
                torch.distributed.broadcast(p.data, src=0)
            elif p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)

    def kd_parameters(self) -> list:
        return [p for p in self.distiller.parameters() if p.requires_grad]

    def setup_optimizers(self):
        train_opt = self.opt['train']
        optim_opt = deepcopy(train_opt['optim_g'])
        optim_type = optim_opt.pop('type')
        groups = [{'params': [p for p in self.net_g.parameters() if p.requires_grad]}]
        kd_params = self.kd_parameters()
        if kd_params:
            group = {'params': kd_params}
            group.update(deepcopy(train_opt.get('optim_kd') or {}))  # optional overrides, e.g. lr
            groups.append(group)
        self.optimizer_g = self.get_optimizer(optim_type, groups, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optimizers = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}
        if optim_type not in optimizers:
            raise NotImplementedError(f'train.optim_*.type: {optim_type!r} is not supported; use one of '
                                      f'{sorted(optimizers)}')
        return optimizers[optim_type](params, lr, **kwargs)

    # ----------------------------------------------------------------- training
    def student_terms(self):
        """Forward teacher and student; return ``(loss terms, output)`` of the student objective."""
        out_t, feats_t = self.distiller.teacher_forward(self.lq)
        output, feats_s = self.distiller.student_forward(self.lq)
        terms = OrderedDict()
        if self.cri_pix:
            terms['l_pix'] = self.cri_pix(output, self.gt)
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            if l_percep is not None:
                terms['l_percep'] = l_percep
            if l_style is not None:
                terms['l_style'] = l_style
        terms.update(self.distiller.kd_terms(output, feats_s, out_t, feats_t))
        return terms, output

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        terms, self.output = self.student_terms()
        l_total = torch.stack(list(terms.values())).sum()
        if self.check_finite(l_total, terms, current_iter, 'student loss'):
            l_total.backward()
            self.sync_training_only(grads=True)
            if self.check_finite_grads(self.optimizer_g, current_iter, 'student'):
                self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(terms)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ----------------------------------------------------------------- non-finite guard
    def check_finite(self, loss: torch.Tensor, terms: dict, current_iter: int, what: str) -> bool:
        """True if ``loss`` is finite. Otherwise the step is skipped and logged; after
        ``train.max_nonfinite`` (default 10) skipped steps in a row, training stops with a clear
        message after saving the (still finite) current weights."""
        if bool(torch.isfinite(loss)):
            if getattr(self, '_last_bad_iter', None) != current_iter:
                self._nonfinite = 0
            return True
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
        self._skip_step(current_iter, f'non-finite {what} ({", ".join(bad) or "total"}); step skipped')
        return False

    def check_finite_grads(self, optimizer: torch.optim.Optimizer, current_iter: int, what: str) -> bool:
        """True if every gradient in ``optimizer`` is finite; otherwise the step is skipped (see ``check_finite``)."""
        grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads])).all()):
            return True
        optimizer.zero_grad(set_to_none=True)
        self._skip_step(current_iter, f'non-finite {what} gradients; step skipped')
        return False

    def _skip_step(self, current_iter: int, message: str) -> None:
        if getattr(self, '_last_bad_iter', None) != current_iter:  # count iterations, not checks
            self._nonfinite = getattr(self, '_nonfinite', 0) + 1
            self._last_bad_iter = current_iter
        limit = int(self.opt['train'].get('max_nonfinite', 10))
        logger = get_root_logger()
        logger.warning(f'iter {current_iter}: {message} ({self._nonfinite} in a row, limit train.max_nonfinite='
                       f'{limit})')
        if self._nonfinite >= limit:
            self.save(epoch=-1, current_iter=current_iter)
            raise FloatingPointError(
                f'Training stopped at iter {current_iter}: {self._nonfinite} non-finite steps in a row. The weights '
                f'were not updated by them; the last good state was saved as iteration {current_iter} in '
                f'{self.opt["path"]["models"]} (resume with --auto_resume). Lower train.optim_g.lr or the loss '
                'weights, or check the data.')

    # ----------------------------------------------------------------- saving
    def training_only_networks(self) -> dict:
        """Label -> module of the trainable, training-only networks saved beside ``net_g``."""
        nets = {}
        if len(list(self.distiller.parameters())) > 0:
            nets['kd'] = self.distiller
        return nets

    def save(self, epoch, current_iter):
        """Save student, training-only networks and the training state, crash-safe.

        Files are written into hidden ``.tmp_<iter>`` folders and then moved into place with
        ``os.replace``, networks first and the training state last, so a kill during saving
        never leaves a truncated file that ``--auto_resume`` would pick up. Refuses to save
        non-finite weights.
        """
        bad = [n for n, p in self.get_bare_model(self.net_g).named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f'refusing to save non-finite student weights ({bad[:3]} ...) at iter '
                                     f'{current_iter}')
        if current_iter != -1:  # the final 'latest' save writes no training state: no collective at shutdown
            self._extra_states = self._gather_extra_states()  # every rank takes part; rank 0 writes them
        if self.opt.get('rank', 0) != 0:
            return  # BasicSR saves on the master rank only
        paths = self.opt['path']
        final = {k: paths[k] for k in ('models', 'training_states')}
        tmp = {k: osp.join(v, f'.tmp_{current_iter}') for k, v in final.items()}
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
        :meth:`extra_training_state` per rank. Errors are raised, not retried and ignored."""
        if current_iter == -1:
            return
        extra = getattr(self, '_extra_states', None) or [self.extra_training_state()]
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers], 'krdistill': {'ranks': extra}}
        torch.save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

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

    def _load_kd_state(self) -> None:
        """On resume, load ``net_<label>_<iter>.pth`` written next to ``net_g_<iter>.pth``."""
        resume = self.opt['path'].get('resume_state')
        if not resume:
            return
        it = osp.splitext(osp.basename(resume))[0]
        for label, net in self.training_only_networks().items():
            load_path = osp.join(self.opt['path']['models'], f'net_{label}_{it}.pth')
            if not osp.isfile(load_path):
                raise FileNotFoundError(f'path.resume_state: {resume} has no net_{label} state {load_path} beside it')
            self.load_network(net, load_path, strict=True, param_key='params')
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
