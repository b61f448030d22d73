"""MetaKDModel: meta knowledge distillation for SR in BasicSR (reconstructed from the abstract
of Zhu, Liu, Chen, arXiv 2207.08356; design in ``docs/METAKD.md``).

Adds to the teacher/student base (teacher, distillation points, checks, checkpoints):

- ``network_kr``: KRNet options, one KRNet per distillation point (``s_channels`` and
  ``t_channels`` are read from a dummy forward); saved as ``net_kr_<iter>.pth`` and loaded from
  ``path.pretrain_network_kr`` (``strict_load_kr``); restored on resume;
- ``train.texture_opt``: the texture-wise loss (``TextureWiseLoss``); ``train.output_kd_opt``;
- ``train.optim_kr``: the KRNets' own optimizer (default: ``optim_g``'s settings); appended to
  ``self.optimizers`` so schedulers and resume handle it;
- ``meta:`` the options of :class:`krdistill.meta_options.MetaOptions` (checked once, by
  :func:`krdistill.build.build_metakd`) and ``dataset`` (optional): a BasicSR dataset block
  for the meta batches (a held-out split; random crops like ``datasets.train``). Without it the
  meta batch is the previous training batch. It lives in ``meta:`` because BasicSR's loop
  accepts no dataset phase other than train and val.

The iteration is :meth:`krdistill.metakd.MetaKD.train_step`, the same code a plain PyTorch loop,
the mmengine front end and the benchmark run. Logs (also to TensorBoard / wandb when the option file turns
them on): ``l_pix``, ``l_texture`` [, ``l_kd_out``], ``kr<i>_texture_gain``, ``kr<i>_texture_entropy``
[, ``kr<i>_fitnet_weight``],
``l_meta``, ``meta_grad_norm``, ``t_meta`` (seconds spent in the meta step).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping

from basicsr.data import build_dataloader, build_dataset
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from ..build import BASICSR_KEYS, build_metakd, build_optimizer
from ..io import load_weights
from ..meta_options import META_DEFAULTS, REMOVED_META_KEYS, check_number, check_removed
from ..option_checks import check_keys
from .teacher_model import TeacherStudentModel, extend_keys

__all__ = ['MetaKDModel']


@MODEL_REGISTRY.register()
class MetaKDModel(TeacherStudentModel):
    """SR student distilled through learned knowledge representations (KRNets) and a meta update."""

    option_keys = extend_keys(TeacherStudentModel.option_keys, top=('network_kr', 'meta'),
                              train=('texture_opt', 'optim_kr'))

    def build_algorithm(self):
        opt, train_opt = self.opt, self.opt['train']
        meta = opt.get('meta') or {}  # checked once, by build_metakd (meta.dataset: here)
        if not isinstance(meta, Mapping):
            raise TypeError(f'meta: must be a mapping of MetaKD\'s meta options, got {type(meta).__name__}')
        check_removed(meta, 'meta', REMOVED_META_KEYS)  # says what replaced it
        check_keys(meta, (*META_DEFAULTS, 'dataset'), 'meta')
        meta = dict(meta)
        if (opt.get('datasets') or {}).get('meta'):
            raise KeyError('datasets.meta: move this block to meta.dataset (BasicSR\'s loop accepts only train and '
                           'val dataset phases)')
        if train_opt.get('kd_opt'):
            raise KeyError('train.kd_opt: MetaKDModel uses train.texture_opt; hand-crafted feature losses '
                           'belong to KDSRModel')
        if not train_opt.get('pixel_opt'):
            raise KeyError('train.pixel_opt: MetaKD needs a pixel loss (also the meta objective)')
        pixel_loss, meta_loss = self.metakd_losses()
        if not self.kd_opt['student_layers']:
            raise ValueError('kd.student_layers / kd.teacher_layers: MetaKD needs at least one distillation point')
        ds_opt = meta.pop('dataset', None)
        start, total = meta.get('start', 0), opt['train']['total_iter']
        if isinstance(start, (int, float)) and not isinstance(start, bool) and start >= total and \
                meta.get('update', META_DEFAULTS['update']) != 'frozen':
            raise ValueError(f'meta.start: {start}, but train.total_iter is {total}: meta-learning would never start '
                             '(the run is its frozen control); lower meta.start, or say meta.update: frozen')
        mkd = build_metakd(self.net_t, self.net_g, self.kd_opt['teacher_layers'], self.kd_opt['student_layers'],
                           network_kr=opt.get('network_kr'), texture_opt=train_opt.get('texture_opt'),
                           output_kd_opt=train_opt.get('output_kd_opt'), pixel_opt=pixel_loss,
                           meta=meta, meta_data=self._meta_loader(ds_opt) if ds_opt else None, shapes=self.kd_shapes,
                           keys=BASICSR_KEYS, upcycle_opt=train_opt.get('upcycle_opt'),
                           meta_loss=meta_loss)
        self.net_kr = mkd.krnets
        load_path = opt['path'].get('pretrain_network_kr')
        if load_path and not opt['path'].get('resume_state'):
            load_weights(self.net_kr, load_path, opt['path'].get('param_key_kr', 'params'),
                         opt['path'].get('strict_load_kr', True), key='path.pretrain_network_kr',
                         key_param='path.param_key_kr', key_strict='path.strict_load_kr', log=get_root_logger().warning)
        return mkd

    def metakd_losses(self):
        """``(pixel_opt, meta_loss)`` for :func:`~krdistill.build.build_metakd`: the student's
        reconstruction loss (here the ``train.pixel_opt`` block, also the meta objective) and the meta
        objective's own criterion (None: the pixel loss). The GAN models override it."""
        return self.opt['train']['pixel_opt'], None

    def _meta_loader(self, ds_opt: dict):
        if not isinstance(ds_opt, dict):
            raise TypeError(f'meta.dataset: must be a dataset block (type, dataroot_gt, dataroot_lq, ...), got {ds_opt!r}')
        ds_opt = copy.deepcopy(ds_opt)
        ds_opt['phase'] = 'train'  # random crops and flips, like the training set
        ds_opt.setdefault('name', 'meta')
        ds_opt.setdefault('options_key', 'meta.dataset')  # errors name this block, not datasets.train
        ds_opt.setdefault('scale', self.opt['scale'])
        train_ds = self.opt['datasets'].get('train', {})
        for k in ('gt_size', 'use_hflip', 'use_rot', 'num_worker_per_gpu', 'batch_size_per_gpu'):
            if k not in ds_opt and k in train_ds:
                ds_opt[k] = train_ds[k]
        dataset = build_dataset(ds_opt)
        if len(dataset) == 0:
            raise ValueError('meta.dataset: the meta dataset is empty')
        get_root_logger().info(f'MetaKD: meta batches from meta.dataset ({len(dataset)} images)')
        loader = build_dataloader(dataset, ds_opt, num_gpu=self.opt['num_gpu'], dist=False, sampler=None,
                                  seed=self.opt.get('manual_seed'))
        return _OnDevice(loader, self.device)

    def setup_optimizers(self):
        super().setup_optimizers()  # the student (the KRNets are not in optimizer_g)
        train_opt = self.opt['train']
        key = 'train.optim_kr' if train_opt.get('optim_kr') else 'train.optim_g (train.optim_kr not set)'
        self.optimizer_kr = build_optimizer(train_opt.get('optim_kr') or train_opt['optim_g'],
                                            self.distiller.kr_parameters(), key)
        self.optimizers.append(self.optimizer_kr)

    def run_iteration(self, current_iter):
        step = self.distiller.train_step(self.lq, self.step_target(), self.optimizer_g, self.optimizer_kr,
                                           it=current_iter)
        self._kr_picture(current_iter)
        return step

    def _kr_picture(self, current_iter: int) -> None:
        """Every ``logger.kr_picture_freq`` (default ``logger.save_image_freq``) iterations, write
        ``visualization/kr_<iter>.png``: kernels, student / teacher textures and the per-texture
        weights over training (:mod:`krdistill.kr_picture`)."""
        log_opt = self.opt.get('logger') or {}
        freq = log_opt.get('kr_picture_freq', log_opt.get('save_image_freq'))
        if not freq:
            return
        freq = check_number(freq, 'logger.kr_picture_freq', minimum=1, integer=True)
        history = getattr(self, '_kr_history', None)
        if history is None:
            history = self._kr_history = {name: [] for name in self.distiller.student_layers}
        every = max(1, freq // 20)
        if current_iter % every == 0:
            for name, term in zip(self.distiller.student_layers, self.distiller.pair_losses):
                if 'texture_weights' in term.stats:
                    history[name].append(term.stats['texture_weights'].cpu().tolist())
        if current_iter % freq or self.opt.get('rank', 0) != 0:
            return
        from ..io import write_image
        from ..kr_picture import draw_points
        path = os.path.join(self.opt['path']['visualization'], f'kr_{current_iter}.png')
        write_image(path, draw_points(self.distiller, self.lq, history))
        get_root_logger().info(f'KRNet picture: {path}')

    # ----------------------------------------------------------------- saving
    def training_only_networks(self) -> dict:
        return {'kr': self.net_kr}

    def extra_training_state(self) -> dict:
        """Random states plus the meta fallback state (the last training batch: the next
        iteration's meta batch when there is no ``meta.dataset``)."""
        return dict(super().extra_training_state(), meta_state=self.distiller.meta_state_dict())

    def load_extra_training_state(self, state: dict) -> None:
        super().load_extra_training_state(state)
        if 'meta_state' in state:
            self.distiller.load_meta_state_dict(state['meta_state'])


class _OnDevice:
    """BasicSR loader batches (``{'lq', 'gt', ...}``) moved to the model's device."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for data in self.loader:
            yield data['lq'].to(self.device), data['gt'].to(self.device)

    def __len__(self):
        return len(self.loader)
