"""Teacher/student feature distillation, framework-free (torch only).

:class:`Distiller` owns the teacher (frozen, never a sub-module: it is not saved), one
:class:`~krdistill.features.FeatureRecorder` per network and the per-pair KD loss modules.
BasicSR's ``KDSRModel`` and ``MetaKDModel`` are thin users of it; any PyTorch loop can use it
directly::

    dist = Distiller(teacher, student, ['body.31'], ['body.15'],
                     pair_losses=[FitNetLoss(64, 256)], output_loss=OutputKDLoss())
    out_t, feats_t = dist.teacher_forward(lq)
    out_s, feats_s = dist.student_forward(lq)
    terms = dist.kd_terms(out_s, feats_s, out_t, feats_t)   # {'l_kd_fitnet': ..., 'l_kd_out': ...}
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .features import FeatureRecorder, unwrap

__all__ = ['Distiller', 'probe', 'freeze_teacher']


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """``eval()`` and ``requires_grad_(False)``: the teacher discipline."""
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def probe(net: nn.Module, layers: Sequence[str], lq: torch.Tensor, key: str = 'layers'):
    """One forward of ``net`` on ``lq``; returns ``(output shape, [feature shapes])``.

    Used before training to read channel counts of the distillation points and to check
    scales. Restores the module's train/eval mode.
    """
    bare = unwrap(net)
    rec = FeatureRecorder(bare, layers, key=key, detach=True)
    was_training = bare.training
    try:
        bare.eval()
        with rec:
            out = bare(lq)
        shapes = [tuple(f.shape) for f in rec.features()]
    finally:
        rec.remove()
        bare.train(was_training)
    return tuple(out.shape), shapes


class Distiller(nn.Module):
    """Compute knowledge-distillation terms between a frozen teacher and a student.

    Only the KD loss modules (e.g. FitNet regressors, KRNets) are sub-modules, so
    ``state_dict()`` holds exactly the training-only KD state.

    Args:
        teacher: teacher network; frozen here (``eval``, no grad) and run under ``no_grad``.
        student: student network (may be DDP/DP-wrapped; hooks go on the bare module).
        teacher_layers: dotted module names of the teacher, one per distillation point.
        student_layers: dotted module names of the student, same length.
        pair_losses: one loss module per point, called as ``loss(feat_s, feat_t)``; or None.
        output_loss: loss on the SR outputs, ``loss(out_s, out_t)``; or None.
        keys: option keys named in error messages.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_layers: Sequence[str],
                 student_layers: Sequence[str], pair_losses: Sequence[nn.Module] | None = None,
                 output_loss: nn.Module | None = None,
                 keys: Mapping[str, str] | None = None):
        super().__init__()
        keys = {'teacher_layers': 'teacher_layers', 'student_layers': 'student_layers', **(keys or {})}
        teacher_layers, student_layers = list(teacher_layers), list(student_layers)
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f'{keys["teacher_layers"]} ({len(teacher_layers)} names) and '
                             f'{keys["student_layers"]} ({len(student_layers)} names) must pair up one to one')
        if pair_losses is not None and len(pair_losses) != len(student_layers):
            raise ValueError(f'{len(pair_losses)} pair losses for {len(student_layers)} distillation points')
        # Not sub-modules: the teacher is never saved, the student belongs to the caller.
        object.__setattr__(self, 'teacher', freeze_teacher(unwrap(teacher)))
        object.__setattr__(self, 'student', student)
        self.teacher_layers = teacher_layers
        self.student_layers = student_layers
        self.rec_t = FeatureRecorder(self.teacher, teacher_layers, key=keys['teacher_layers'], detach=True)
        self.rec_s = FeatureRecorder(student, student_layers, key=keys['student_layers'])
        self.pair_losses = nn.ModuleList(pair_losses or [])
        self.output_loss = output_loss

    def train(self, mode: bool = True) -> 'Distiller':
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode whatever the caller does
        return self

    @torch.no_grad()
    def teacher_forward(self, lq: torch.Tensor):
        """Teacher output and features (no graph)."""
        self.teacher.eval()
        if self.teacher_layers:
            with self.rec_t:
                out = self.teacher(lq)
            return out, self.rec_t.features()
        return self.teacher(lq), []

    def student_forward(self, lq: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None):
        """Student output and features (with graph). ``params``: run with these parameters instead
        (``torch.func.functional_call`` on the bare student; used by the meta step)."""
        net = self.student if params is None else unwrap(self.student)
        if not self.student_layers:
            return (net(lq) if params is None else functional_call(net, dict(params), (lq,))), []
        with self.rec_s:
            out = net(lq) if params is None else functional_call(net, dict(params), (lq,))
        return out, self.rec_s.features()

    def kd_terms(self, out_s: torch.Tensor, feats_s: Sequence[torch.Tensor], out_t: torch.Tensor,
                 feats_t: Sequence[torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
        """Named KD loss terms: ``l_kd_<tag>`` summed over points, and ``l_kd_out``."""
        terms: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        per_tag: dict[str, list] = {}
        for loss, fs, ft in zip(self.pair_losses, feats_s, feats_t):
            per_tag.setdefault(getattr(loss, 'tag', 'feat'), []).append(loss(fs, ft))
        for tag, values in per_tag.items():
            terms[f'l_kd_{tag}'] = torch.stack(values).sum()
        if self.output_loss is not None:
            terms['l_kd_out'] = self.output_loss(out_s, out_t)
        return terms

    def remove_hooks(self) -> None:
        self.rec_t.remove()
        self.rec_s.remove()
