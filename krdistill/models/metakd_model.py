"""MetaKDModel: meta knowledge distillation for SR in BasicSR (reconstructed from the abstract
of Zhu, Liu, Chen, arXiv 2207.08356).

Adds to :class:`~krdistill.models.kd_model.KDSRModel` (teacher, hooks, checks):

- ``network_kr``: KRNet options, one KRNet per distillation point (``s_channels`` and
  ``t_channels`` are filled in from a dummy forward); saved as ``net_kr_<iter>.pth`` and
  loaded from ``path.pretrain_network_kr`` (set automatically on resume);
- ``train.texture_opt``: the texture-wise loss (``TextureWiseLoss``);
- ``train.optim_kr``: the KRNets' own optimizer (its scheduler follows ``train.scheduler``);
  appended to ``self.optimizers`` so schedulers and resume handle it;
- ``meta:`` ``every``, ``mode``, ``inner_lr``, ``precond``, ``update``, ``fd_eps`` (see
  :data:`krdistill.metakd.META_DEFAULTS`);
- ``datasets.meta`` (optional): the meta batches; without it the previous training batch is
  used (the current one at the first iteration).

The work is done by the framework-free code: the maths by :class:`krdistill.metakd.MetaDistiller`,
the iteration (teacher once per batch, meta batch, meta step, student backward) by
:class:`krdistill.api.MetaKD`, the same object a plain PyTorch loop uses. This class only wires
options, optimizers, data, non-finite checks, DDP and checkpoints. Logs: ``l_pix``, ``l_texture``,
``l_meta``, ``meta_grad_norm``, ``t_meta`` (seconds spent in the meta step).
"""
from __future__ import annotations

import copy

from basicsr.archs import build_network
from basicsr.data import build_dataloader, build_dataset
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

from ..api import MetaKD
from ..metakd import MetaDistiller, check_meta_options
from .kd_model import KDSRModel, build_kd_loss


@MODEL_REGISTRY.register()
class MetaKDModel(KDSRModel):
    """SR student distilled through learned knowledge representations (KRNets) and a meta update."""

    def _build_distiller(self) -> None:
        opt, train_opt = self.opt, self.opt['train']
        self.meta_opt = check_meta_options(opt.get('meta'))
        if not self.kd_opt['student_layers']:
            raise ValueError('kd.student_layers / kd.teacher_layers: MetaKD needs at least one distillation point')
        kr_opt = opt.get('network_kr') or {'type': 'KRNet'}
        if kr_opt.get('type') not in ARCH_REGISTRY:
            raise KeyError(f'network_kr.type: {kr_opt.get("type")!r} is not a registered arch')
        krnets = []
        for ss, ts in zip(self.kd_shapes['student'], self.kd_shapes['teacher']):
            kr = copy.deepcopy(kr_opt)
            for k in ('s_channels', 't_channels'):
                if k in kr:
                    raise KeyError(f'network_kr.{k}: do not set it; it is read from the networks')
            kr.update(s_channels=ss[1], t_channels=ts[1])
            try:
                krnets.append(build_network(kr))
            except TypeError as e:
                raise TypeError(f'network_kr: cannot build {kr_opt.get("type")} from {kr_opt}: {e}') from e
        tex_opt = train_opt.get('texture_opt') or {'type': 'TextureWiseLoss'}
        texture_loss = build_kd_loss(tex_opt, 'train.texture_opt')
        out_opt = train_opt.get('output_kd_opt')
        output_loss = build_kd_loss(out_opt, 'train.output_kd_opt') if out_opt else None
        if train_opt.get('kd_opt'):
            raise KeyError('train.kd_opt: MetaKDModel uses train.texture_opt; hand-crafted feature losses '
                           'belong to KDSRModel')
        if not train_opt.get('pixel_opt'):
            raise KeyError('train.pixel_opt: MetaKD needs a pixel loss (also the meta objective)')
        pixel_loss = build_kd_loss(train_opt['pixel_opt'], 'train.pixel_opt').to(self.device)
        self.distiller = MetaDistiller(
            self.net_t, self.net_g, self.kd_opt['teacher_layers'], self.kd_opt['student_layers'], krnets,
            texture_loss=texture_loss, pixel_loss=pixel_loss, output_loss=output_loss, meta=self.meta_opt,
            keys=dict(teacher_layers='kd.teacher_layers', student_layers='kd.student_layers')).to(self.device)
        self.net_kr = self.distiller.krnets
        self.sync_training_only()  # same KRNet initialisation on every rank
        load_path = opt['path'].get('pretrain_network_kr')
        if opt['path'].get('resume_state'):
            self._load_kd_state()  # net_kr_<iter>.pth of the resumed iteration
        elif load_path:
            self.load_network(self.net_kr, load_path, opt['path'].get('strict_load_kr', True), 'params')
        self._meta_loader = None
        self._build_meta_loader()

    def _build_meta_loader(self) -> None:
        ds_opt = (self.opt.get('datasets') or {}).get('meta')
        if not ds_opt:
            return
        ds_opt = copy.deepcopy(ds_opt)
        ds_opt['phase'] = 'train'  # random crops and flips, like the training set
        ds_opt.setdefault('scale', self.opt['scale'])
        train_ds = self.opt['datasets'].get('train', {})
        for k in ('gt_size', 'use_hflip', 'use_rot', 'num_worker_per_gpu', 'batch_size_per_gpu'):
            if k not in ds_opt and k in train_ds:
                ds_opt[k] = train_ds[k]
        dataset = build_dataset(ds_opt)
        if len(dataset) == 0:
            raise ValueError('datasets.meta: the meta dataset is empty')
        loader = build_dataloader(dataset, ds_opt, num_gpu=self.opt['num_gpu'], dist=False, sampler=None,
                                  seed=self.opt.get('manual_seed'))
        self._meta_loader = loader
        get_root_logger().info(f'MetaKD: meta batches from datasets.meta ({len(dataset)} images)')

    def setup_optimizers(self):
        super().setup_optimizers()  # student (the KRNets are not in optimizer_g: see kd_parameters)
        optim_opt = copy.deepcopy(self.opt['train'].get('optim_kr') or self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        self.optimizer_kr = self.get_optimizer(optim_type, self.distiller.kr_parameters(), **optim_opt)
        self.optimizers.append(self.optimizer_kr)
        # the iteration logic (teacher once per batch, meta batch, meta step, student backward) is the
        # framework-free front end's; this class adds BasicSR's options, checks and checkpoints
        self.mkd = MetaKD.from_distiller(self.distiller, self.optimizer_kr, meta_data=self._meta_loader)

    def kd_parameters(self) -> list:
        return []  # KRNet parameters have their own optimizer

    # ----------------------------------------------------------------- training
    def optimize_parameters(self, current_iter):
        mkd = self.mkd
        joint = bool(self.distiller.joint_kr_parameters())  # KRNet parameters trained on the student loss

        def meta_ok(info):  # take the KRNet meta step only with a finite loss and gradients
            return self.check_finite(info['l_meta'], {'l_meta': info['l_meta']}, current_iter, 'meta loss') and \
                self.check_finite_grads(self.optimizer_kr, current_iter, 'KRNet meta')

        ok = False
        try:
            log = mkd.meta_update(self.lq, self.gt, student_optimizer=self.optimizer_g, it=current_iter,
                                  step_if=meta_ok)
            self.optimizer_g.zero_grad(set_to_none=True)
            l_total, terms, self.output = mkd.loss(self.lq, self.gt)
            if self.check_finite(l_total, terms, current_iter, 'student loss'):
                checked = {}

                def backward(loss, inputs):
                    loss.backward(inputs=inputs)
                    if joint:  # KRNets are outside DDP: average their gradients before the step
                        self.sync_training_only(grads=True)

                def grads_ok():
                    if 'ok' not in checked:
                        checked['ok'] = self.check_finite_grads(self.optimizer_g, current_iter, 'student') and \
                            self.check_finite_grads(self.optimizer_kr, current_iter, 'KRNet')
                    return checked['ok']

                mkd.backward(l_total, backward=backward, step_if=grads_ok)
                ok = grads_ok()
                if ok:
                    self.optimizer_g.step()
        finally:
            if not ok:
                mkd.forget_batch()  # a bad batch is no meta batch for the next iteration
            mkd.end_iteration()
        terms.update(log)
        self.log_dict = self.reduce_loss_dict(terms)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ----------------------------------------------------------------- saving
    def training_only_networks(self) -> dict:
        return {'kr': self.net_kr}

    def extra_training_state(self) -> dict:
        """Random states plus the meta fallback state (the last training batch: the next
        iteration's meta batch when there is no ``datasets.meta``)."""
        return dict(super().extra_training_state(), meta_state=self.mkd.meta_state_dict())

    def load_extra_training_state(self, state: dict) -> None:
        super().load_extra_training_state(state)
        if 'meta_state' in state:
            meta = state['meta_state']
            if 'last_batch' in meta:
                meta = dict(meta, last_batch=[t.to(self.device) for t in meta['last_batch']])
            self.mkd.load_meta_state_dict(meta)
