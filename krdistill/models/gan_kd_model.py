"""Distillation inside BasicSR's GAN training: the teacher's knowledge joins the generator step of
``SRGANModel``, ``ESRGANModel`` and ``RealESRGANModel``; ``RealESRNetModel`` (the PSNR stage of
Real-ESRGAN) gets it in its one step. Design in ``docs/GAN_KD.md``.

Registered models (``model_type``)::

    KDSRGANModel       MetaKDSRGANModel         SRGANModel + KDSRModel / MetaKDModel
    KDESRGANModel      MetaKDESRGANModel        ESRGANModel (relativistic GAN)
    KDRealESRNetModel  MetaKDRealESRNetModel    RealESRNetModel (second-order degradations, no GAN)
    KDRealESRGANModel  MetaKDRealESRGANModel    RealESRGANModel (degradations, USM targets, UNet discriminator)

YAML: the BasicSR GAN option file as it is (``network_d``, ``train.optim_d``, ``train.pixel_opt``,
``train.perceptual_opt``, ``train.gan_opt``, ``net_d_iters``, ``net_d_init_iters``, ``ema_decay``) plus
krdistill's blocks (``network_t``, ``path.pretrain_network_t`` / ``param_key_t``, ``kd``,
``train.kd_opt``, ``train.output_kd_opt``, ``train.upcycle_opt``; for MetaKD ``network_kr``,
``train.texture_opt``, ``train.optim_kr``, ``meta``). See ``options/train/gan/``.

One iteration:

1. the generator step, on generator iterations (``iter % net_d_iters == 0`` and ``iter >
   net_d_init_iters``, BasicSR's rule): :meth:`Distiller.train_step <krdistill.distiller.Distiller.train_step>`
   / :meth:`MetaKD.train_step <krdistill.metakd.MetaKD.train_step>`, the one distillation step of every
   front end, with the generator's BasicSR terms (``l_g_pix``, ``l_g_ldl``, ``l_g_percep``,
   ``l_g_style``, ``l_g_gan``; :meth:`GANDistillMixin.pixel_terms`) as its reconstruction terms. The
   teacher sees the student's input (``self.lq``, after the Real-ESRGAN degradations of ``feed_data``);
2. the discriminator step, BasicSR's arithmetic line for line (:meth:`GANDistillMixin.discriminator_step`),
   on the student's output of this iteration.

Both steps follow the SR models' non-finite policy: a step whose loss or gradients are not finite is
not taken, and ``train.max_nonfinite`` skipped iterations in a row stop the run with the last good
state saved. The teacher is frozen, never DDP-wrapped and never saved; ``net_d``, its optimizer and
``net_g_ema`` are saved and resumed as BasicSR does.

MetaKD: the virtual step is the generator's full step (GAN term included, the discriminator held
fixed); the meta objective is the generator's reconstruction terms (``train.pixel_opt`` and
``train.perceptual_opt``) on the meta batch, without the GAN term. Why: :meth:`GANDistillMixin.meta_loss`.

The Real-ESRGAN models of BasicSR 1.4.2 call ``.cuda()`` in ``__init__`` and ``feed_data``: they
train on a GPU only. ``SRGANModel`` / ``ESRGANModel`` with paired data run anywhere.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from basicsr.models.esrgan_model import ESRGANModel
from basicsr.models.realesrgan_model import RealESRGANModel
from basicsr.models.realesrnet_model import RealESRNetModel
from basicsr.models.srgan_model import SRGANModel
from basicsr.utils.registry import MODEL_REGISTRY

from ..build import build_optimizer
from ..distiller import all_finite
from .kd_model import KDSRModel
from .metakd_model import MetaKDModel
from .teacher_model import extend_keys

__all__ = ['GANDistillMixin', 'KDSRGANModel', 'KDESRGANModel', 'MetaKDSRGANModel', 'MetaKDESRGANModel',
           'KDRealESRNetModel', 'KDRealESRGANModel', 'MetaKDRealESRNetModel', 'MetaKDRealESRGANModel',
           'GAN_MODEL_TYPES']


#: the top-level keys BasicSR's Real-ESRGAN models read in ``feed_data`` (second-order degradations)
DEGRADATION_KEYS = ('resize_prob', 'resize_range', 'gaussian_noise_prob', 'noise_range', 'poisson_scale_range',
                    'gray_noise_prob', 'jpeg_range', 'second_blur_prob', 'resize_prob2', 'resize_range2',
                    'gaussian_noise_prob2', 'noise_range2', 'poisson_scale_range2', 'gray_noise_prob2', 'jpeg_range2',
                    'gt_size')


def check_degradation_options(opt: dict) -> None:
    """Before iteration 1: the degradation keys ``feed_data`` of the Real-ESRGAN models would read at
    iteration 1 (only with ``high_order_degradation``, BasicSR's default true)."""
    if not opt.get('high_order_degradation', True):
        return
    missing = [k for k in DEGRADATION_KEYS if k not in opt]
    if missing:
        raise KeyError(f'{missing[0]}: {opt["model_type"]} synthesises its LR input in feed_data and needs the '
                       f'top-level degradation keys (missing: {missing}); see options/train/gan/')


class _RealDegradationChecks:
    """``RealESRNetModel``'s options checked before anything is built."""

    def init_training_settings(self):
        if self.opt.get('high_order_degradation', True) and 'gt_usm' not in self.opt:
            raise KeyError(f'gt_usm: {self.opt["model_type"]} needs it (true: train on the USM-sharpened GT)')
        check_degradation_options(self.opt)
        super().init_training_settings()


class GANDistillMixin:
    """The distillation terms in the generator step of a BasicSR GAN model.

    Put it first among the bases, before ``KDSRModel`` / ``MetaKDModel`` and the BasicSR GAN model,
    e.g. ``class KDSRGANModel(GANDistillMixin, KDSRModel, SRGANModel)``. It overrides
    ``optimize_parameters`` (the generator step is the distillation step; the discriminator step is
    BasicSR's), ``pixel_terms`` (BasicSR's generator terms) and ``setup_optimizers`` (BasicSR's
    ``optimizer_d`` after the student's); BasicSR builds ``net_d``, ``net_g_ema`` and the losses.
    """

    #: ``'vanilla'`` (SRGAN / Real-ESRGAN) or ``'relativistic'`` (ESRGAN) GAN terms
    gan_kind = 'vanilla'
    #: the Real-ESRGAN targets: ``l1_gt_usm``, ``percep_gt_usm``, ``gan_gt_usm``, the LDL term
    real_targets = False

    # ----------------------------------------------------------------- building
    def init_training_settings(self):
        self._check_gan_options()
        super().init_training_settings()

    def _check_gan_options(self) -> None:
        """Before anything is built: the blocks BasicSR's GAN model reads and would only miss later."""
        opt, train = self.opt, self.opt['train']
        name = opt['model_type']
        net_d = opt.get('network_d')
        if not isinstance(net_d, dict) or 'type' not in net_d:
            raise KeyError(f'network_d: {name} needs a discriminator block with a type, e.g. '
                           '{type: UNetDiscriminatorSN, num_in_ch: 3, num_feat: 64, skip_connection: true}')
        if not isinstance(train.get('optim_d'), dict):
            raise KeyError(f'train.optim_d: {name} needs the discriminator\'s optimizer, e.g. '
                           '{type: Adam, lr: 1.0e-4, betas: [0.9, 0.99]}')
        if not isinstance(train.get('gan_opt'), dict):
            raise KeyError(f'train.gan_opt: {name} needs the GAN loss, e.g. '
                           '{type: GANLoss, gan_type: vanilla, loss_weight: 1.0e-1}')
        if self.real_targets:
            for key in ('l1_gt_usm', 'percep_gt_usm', 'gan_gt_usm'):
                if key not in opt:
                    raise KeyError(f'{key}: {name} needs it (true: the USM-sharpened GT is that loss\'s target)')
            check_degradation_options(opt)

    def setup_optimizers(self):
        super().setup_optimizers()  # the student (and KD regressors; MetaKD: optimizer_kr)
        self.optimizer_d = build_optimizer(self.opt['train']['optim_d'], self.net_d.parameters(), 'train.optim_d')
        self.optimizers.append(self.optimizer_d)

    # ----------------------------------------------------------------- the generator terms
    def step_target(self):
        return self.gt_usm if self.real_targets and self.opt['l1_gt_usm'] is not False else self.gt

    def _target(self, key: str):
        """A Real-ESRGAN target (``percep`` or ``gan``): the USM-sharpened GT unless ``<key>_gt_usm: false``."""
        if self.real_targets and self.opt[f'{key}_gt_usm'] is not False:
            return self.gt_usm
        return self.gt

    def pixel_terms(self, sr: torch.Tensor, gt: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        """BasicSR's generator terms, their order and log names: ``l_g_pix`` (``train.pixel_opt``, on
        ``gt``), [``l_g_ldl``], ``l_g_percep`` / ``l_g_style`` (``train.perceptual_opt``), ``l_g_gan``
        (``train.gan_opt``; vanilla or relativistic as the BasicSR model computes it). The
        discriminator's parameters are frozen here (as in BasicSR); gradients reach ``sr`` through it."""
        terms = OrderedDict()
        if self.cri_pix:
            terms['l_g_pix'] = self.cri_pix(sr, gt)
        if getattr(self, 'cri_ldl', None) and self.real_targets:
            from basicsr.losses.loss_util import get_refined_artifact_map
            weight = get_refined_artifact_map(self.gt, sr, self.output_ema, 7)
            terms['l_g_ldl'] = self.cri_ldl(torch.mul(weight, sr), torch.mul(weight, self.gt))
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(sr, self._target('percep'))
            if l_percep is not None:
                terms['l_g_percep'] = l_percep
            if l_style is not None:
                terms['l_g_style'] = l_style
        if self.gan_kind == 'relativistic':  # ESRGANModel.optimize_parameters
            real_d_pred = self.net_d(self.gt).detach()
            fake_g_pred = self.net_d(sr)
            l_g_real = self.cri_gan(real_d_pred - torch.mean(fake_g_pred), False, is_disc=False)
            l_g_fake = self.cri_gan(fake_g_pred - torch.mean(real_d_pred), True, is_disc=False)
            terms['l_g_gan'] = (l_g_real + l_g_fake) / 2
        else:  # SRGANModel / RealESRGANModel
            terms['l_g_gan'] = self.cri_gan(self.net_d(sr), True, is_disc=False)
        return terms

    def meta_loss(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """MetaKD's meta objective in GAN training: the generator's reconstruction terms
        (``train.pixel_opt`` and, when set, ``train.perceptual_opt``, with their weights) of the virtual
        student on the meta batch; the GAN term is left out.

        Why: the meta objective has to say which knowledge makes the student *better*, measured the
        same way at every iteration. The reconstruction terms compare with the ground truth and do not
        move. The generator's GAN term is measured by a discriminator that changes every iteration and
        is lowest for whatever fools today's discriminator (artifacts included), so a meta gradient on
        it would chase the discriminator rather than the teacher's knowledge. The GAN term still shapes
        the virtual step (it is part of the generator's full loss there), so the meta gradient sees how
        the distillation terms interact with the adversarial update.
        """
        value = self.cri_pix(sr, gt)
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(sr, gt)
            for extra in (l_percep, l_style):
                if extra is not None:
                    value = value + extra
        return value

    def metakd_losses(self):
        return self.pixel_terms, self.meta_loss

    # ----------------------------------------------------------------- one iteration
    def optimize_parameters(self, current_iter):
        for p in self.net_d.parameters():
            p.requires_grad = False
        if self.real_targets and getattr(self, 'cri_ldl', None):
            self.output_ema = self.net_g_ema(self.lq)
        logs = OrderedDict()
        g_skipped = None
        if current_iter % self.net_d_iters == 0 and current_iter > self.net_d_init_iters:
            step = self.run_iteration(current_iter)  # the one distillation step, BasicSR's terms inside
            self.output = step.output
            logs.update((k, v) for k, v in step.logs.items() if k != 'l_total')
            g_skipped = step.skipped
        else:
            with torch.no_grad():
                self.output = self.net_g(self.lq)
        for p in self.net_d.parameters():
            p.requires_grad = True
        d_logs, d_skipped = self.discriminator_step(self.output)
        logs.update(d_logs)
        why = [s for s in (g_skipped, d_skipped) if s]
        if why:
            self._skip(current_iter, '; '.join(why))
        else:
            self._nonfinite = 0
        self.log_dict = self.reduce_loss_dict(logs)
        if self.ema_decay > 0 and g_skipped is None:
            self.model_ema(decay=self.ema_decay)

    def discriminator_step(self, output: torch.Tensor):
        """BasicSR's discriminator step on ``output`` (detached), taken only when its losses and
        gradients are finite: ``(logs, skipped)``."""
        self.optimizer_d.zero_grad()
        logs = OrderedDict()
        if self.gan_kind == 'relativistic':  # ESRGANModel.optimize_parameters
            fake_d_pred = self.net_d(output).detach()
            real_d_pred = self.net_d(self.gt)
            l_d_real = self.cri_gan(real_d_pred - torch.mean(fake_d_pred), True, is_disc=True) * 0.5
            l_d_real.backward()
            fake_d_pred = self.net_d(output.detach())
            l_d_fake = self.cri_gan(fake_d_pred - torch.mean(real_d_pred.detach()), False, is_disc=True) * 0.5
            l_d_fake.backward()
            logs['l_d_real'] = l_d_real
            logs['l_d_fake'] = l_d_fake
            logs['out_d_real'] = torch.mean(real_d_pred.detach())
            logs['out_d_fake'] = torch.mean(fake_d_pred.detach())
        else:  # SRGANModel / RealESRGANModel (on the gan_gt target)
            real_d_pred = self.net_d(self._target('gan'))
            l_d_real = self.cri_gan(real_d_pred, True, is_disc=True)
            logs['l_d_real'] = l_d_real
            logs['out_d_real'] = torch.mean(real_d_pred.detach())
            l_d_real.backward()
            fake_d_pred = self.net_d(output.detach().clone())
            l_d_fake = self.cri_gan(fake_d_pred, False, is_disc=True)
            logs['l_d_fake'] = l_d_fake
            logs['out_d_fake'] = torch.mean(fake_d_pred.detach())
            l_d_fake.backward()
        logs = OrderedDict((k, v.detach()) for k, v in logs.items())
        if not all_finite([l_d_real, l_d_fake]):
            skipped = 'non-finite discriminator loss'
        elif not all_finite([p.grad for p in self.net_d.parameters()]):
            skipped = 'non-finite discriminator gradients'
        else:
            self.optimizer_d.step()
            return logs, None
        self.optimizer_d.zero_grad()
        return logs, skipped

    # ----------------------------------------------------------------- saving
    def saved_tensors(self):
        yield from super().saved_tensors()
        for name, t in self.get_bare_model(self.net_d).state_dict().items():
            yield f'net_d.{name}', t


@MODEL_REGISTRY.register()
class KDSRGANModel(GANDistillMixin, KDSRModel, SRGANModel):
    """``SRGANModel`` whose generator step adds hand-crafted KD (output KD, FitNet, AT, FAKD, upcycling)."""


@MODEL_REGISTRY.register()
class KDESRGANModel(GANDistillMixin, KDSRModel, ESRGANModel):
    """``ESRGANModel`` (relativistic GAN) whose generator step adds hand-crafted KD."""
    gan_kind = 'relativistic'


@MODEL_REGISTRY.register()
class MetaKDSRGANModel(GANDistillMixin, MetaKDModel, SRGANModel):
    """``SRGANModel`` whose generator step is MetaKD's (KRNets, texture-wise loss, meta step)."""


@MODEL_REGISTRY.register()
class MetaKDESRGANModel(GANDistillMixin, MetaKDModel, ESRGANModel):
    """``ESRGANModel`` whose generator step is MetaKD's."""
    gan_kind = 'relativistic'


@MODEL_REGISTRY.register()
class KDRealESRGANModel(GANDistillMixin, KDSRModel, RealESRGANModel):
    """BasicSR's ``RealESRGANModel`` (degradations in ``feed_data``; GPU only) with hand-crafted KD."""
    real_targets = True


@MODEL_REGISTRY.register()
class MetaKDRealESRGANModel(GANDistillMixin, MetaKDModel, RealESRGANModel):
    """BasicSR's ``RealESRGANModel`` (GPU only) with MetaKD in the generator step."""
    real_targets = True


@MODEL_REGISTRY.register()
class KDRealESRNetModel(_RealDegradationChecks, KDSRModel, RealESRNetModel):
    """BasicSR's ``RealESRNetModel`` (the PSNR stage: degradations in ``feed_data``, GPU only) with
    hand-crafted KD; the teacher sees the degraded input."""


@MODEL_REGISTRY.register()
class MetaKDRealESRNetModel(_RealDegradationChecks, MetaKDModel, RealESRNetModel):
    """BasicSR's ``RealESRNetModel`` (GPU only) with MetaKD."""


#: the model types of this module
GAN_MODEL_TYPES = ('KDSRGANModel', 'KDESRGANModel', 'MetaKDSRGANModel', 'MetaKDESRGANModel', 'KDRealESRNetModel',
                   'KDRealESRGANModel', 'MetaKDRealESRNetModel', 'MetaKDRealESRGANModel')

#: top-level keys BasicSR's Real-ESRGAN / Real-ESRNet models read (beyond BasicSR's common ones)
REAL_TOP_KEYS = DEGRADATION_KEYS + ('high_order_degradation', 'gt_usm', 'l1_gt_usm', 'percep_gt_usm', 'gan_gt_usm',
                                    'queue_size')
for _cls in (KDRealESRGANModel, MetaKDRealESRGANModel, KDRealESRNetModel, MetaKDRealESRNetModel):
    _cls.option_keys = extend_keys(_cls.option_keys, top=REAL_TOP_KEYS)  # the KD / MetaKD model's keys, plus these
del _cls
