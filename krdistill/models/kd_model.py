"""KDSRModel: BasicSR ``SRModel`` plus a frozen teacher and hand-crafted KD losses.

YAML (see ``options/train/kd/``)::

    model_type: KDSRModel
    network_g: {type: EDSR, ...}          # student
    network_t: {type: EDSR, ...}          # teacher; path.pretrain_network_t, param_key_t, strict_load_t
    kd: {teacher_layers: [body.31], student_layers: [body.15]}
    train:
      pixel_opt: {type: L1Loss, loss_weight: 1.0}
      kd_opt: {type: FitNetLoss, loss_weight: 1.0}         # per distillation point (optional)
      output_kd_opt: {type: OutputKDLoss, loss_weight: 1.0} # on SR outputs (optional)
      optim_kd: {lr: 1.0e-3}                                # optional overrides for the regressors

The iteration is :meth:`krdistill.distiller.Distiller.train_step`. KD parameters (FitNet
regressors) are trained with the student's optimizer (a second param group), saved as
``net_kd_<iter>.pth`` and restored on resume.
"""
from __future__ import annotations

from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from ..build import BASICSR_KEYS, build_distiller
from .teacher_model import KD_KEYS, TeacherStudentModel

__all__ = ['KDSRModel', 'KD_KEYS']


@MODEL_REGISTRY.register()
class KDSRModel(TeacherStudentModel):
    """SR model distilled from a frozen teacher (output KD, FitNet, AT, FAKD, ...)."""

    def build_algorithm(self):
        train_opt = self.opt['train']
        if not any(train_opt.get(k) for k in ('output_kd_opt', 'kd_opt', 'upcycle_opt')):
            raise ValueError('train: KDSRModel has no KD term; set train.output_kd_opt (on the SR outputs), '
                           'train.kd_opt (per distillation point, with kd.teacher_layers / kd.student_layers) or '
                           'train.upcycle_opt (DUKD). Without a teacher, train with model_type: SRModel')
        if self.kd_opt['student_layers'] and not train_opt.get('kd_opt'):
            get_root_logger().warning('kd.teacher_layers / kd.student_layers are set but train.kd_opt is not: the '
                                      'distillation points are checked, not distilled')
        return build_distiller(self.net_t, self.net_g, self.kd_opt['teacher_layers'], self.kd_opt['student_layers'],
                               kd_opt=train_opt.get('kd_opt'), output_kd_opt=train_opt.get('output_kd_opt'),
                               upcycle_opt=train_opt.get('upcycle_opt'),
                               pixel_opt=self.pixel_terms, shapes=self.kd_shapes, keys=BASICSR_KEYS)

    def run_iteration(self, current_iter):
        return self.distiller.train_step(self.lq, self.step_target(), self.optimizer_g, it=current_iter)
