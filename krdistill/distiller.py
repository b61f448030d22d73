"""Hand-crafted teacher/student distillation and its training iteration, framework-free (torch only).

:class:`Distiller` owns the frozen teacher (never a sub-module: it is not saved), one
:class:`~krdistill.features.FeatureRecorder` per network and the per-point KD losses (FitNet
regressors, ...). It computes the student objective and runs one training iteration
(:meth:`Distiller.train_step`); :class:`~krdistill.metakd.MetaKD` extends it with the KRNets and
the meta step. BasicSR's ``KDSRModel``, the benchmark and a plain loop all call the same
``train_step``::

    dist = build_distiller(teacher, student, ['body.31'], ['body.15'],        # krdistill.build
                           kd_opt={'type': 'FitNetLoss'}, output_kd_opt={'type': 'OutputKDLoss'})
    opt = torch.optim.Adam(list(student.parameters()) + dist.kd_parameters(), 2e-4)
    for lq, gt in loader:
        step = dist.train_step(lq, gt, opt)     # step.logs: l_pix, l_kd_fitnet, l_kd_out; step.skipped

A step whose loss or gradients are not finite is not taken (``step.skipped`` says why); what to do
about it (count, stop) is the caller's policy.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .features import FeatureRecorder, unwrap
from .upcycle import Upcycled, Upcycler

__all__ = ['Distiller', 'StepResult', 'merge_steps', 'probe', 'freeze_teacher', 'all_finite', 'average_over_ranks', 'world_size',
           'unwrap_optimizer']

TeacherOutput = tuple  # (out_t, [feat_t per point])


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


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def average_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """In-place mean over ranks (no-op in one process)."""
    world = world_size()
    if world == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(world)


def all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    """True when every given tensor (None entries skipped) holds only finite values (one sync)."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return True
    return bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(t.detach().float()) for t in ts])).all())


def unwrap_optimizer(optimizer):
    """The ``torch.optim`` optimizer under a wrapper (mmengine's ``OptimWrapper`` has ``.optimizer``)."""
    return getattr(optimizer, 'optimizer', optimizer)


@dataclasses.dataclass
class StepResult:
    """What one :meth:`Distiller.train_step` did.

    ``logs``: detached scalars (``l_total``, the loss terms and, for MetaKD, ``l_meta``,
    ``meta_grad_norm``, ``t_meta``); ``skipped``: None when every step was taken, else why a
    step was not (non-finite loss or gradients); ``output``: the student's SR output (detached).
    """
    logs: 'OrderedDict[str, torch.Tensor]'
    skipped: str | None = None
    output: torch.Tensor | None = None


def merge_steps(first: StepResult, second: StepResult) -> StepResult:
    """One :class:`StepResult` of two optimizer steps in one iteration (logs of both, both reasons)."""
    first.logs.update(second.logs)
    first.skipped = '; '.join(s for s in (first.skipped, second.skipped) if s) or None
    return first


class Distiller(nn.Module):
    """Knowledge distillation from a frozen teacher into a student (output KD, FitNet, AT, FAKD, ...).

    Only the KD loss modules (e.g. FitNet regressors) are sub-modules, so ``state_dict()`` holds
    exactly the training-only KD state.

    Args:
        teacher: teacher network; frozen here (``eval``, no grad), run under ``no_grad``. May be
            None when no term needs it (the student alone).
        student: student network (may be DDP/DP-wrapped; hooks go on the bare module).
        teacher_layers: dotted module names of the teacher, one per distillation point.
        student_layers: dotted module names of the student, same length.
        pair_losses: one loss module per point, called as ``loss(feat_s, feat_t)``; or None.
        output_loss: loss on the SR outputs, ``loss(out_s, out_t)``; or None.
        pixel_loss: the reconstruction loss ``(sr, gt) -> tensor`` (logged as ``l_pix``) or
            ``-> {name: tensor}`` (several terms, e.g. BasicSR's pixel and perceptual losses).
        keys: option keys named in error messages.
        upcycle: an :class:`~krdistill.upcycle.Upcycler` (DUKD's data upcycling: zoom-in, zoom-out,
            label-consistency augmentations) whose terms join the student objective
            (``steps: 1``) or make a second optimizer step (``steps: 2``); or None.
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module, teacher_layers: Sequence[str] = (),
                 student_layers: Sequence[str] = (), pair_losses: Sequence[nn.Module] | None = None,
                 output_loss: nn.Module | None = None, pixel_loss: Callable | None = None,
                 keys: Mapping[str, str] | None = None, upcycle: Upcycler | None = None):
        super().__init__()
        keys = {'teacher_layers': 'teacher_layers', 'student_layers': 'student_layers', **(keys or {})}
        teacher_layers, student_layers = list(teacher_layers), list(student_layers)
        if len(teacher_layers) != len(student_layers):
            raise ValueError(f'{keys["teacher_layers"]} ({len(teacher_layers)} names) and '
                             f'{keys["student_layers"]} ({len(student_layers)} names) must pair up one to one')
        if pair_losses is not None and len(pair_losses) != len(student_layers):
            raise ValueError(f'{len(pair_losses)} pair losses for {len(student_layers)} distillation points')
        if teacher is None and (teacher_layers or output_loss is not None or upcycle is not None):
            raise ValueError('Distiller: a teacher is needed for feature, output KD or upcycling terms')
        # Not sub-modules: the teacher is never saved, the student belongs to the caller.
        object.__setattr__(self, 'teacher', freeze_teacher(unwrap(teacher)) if teacher is not None else None)
        object.__setattr__(self, 'student', student)
        self.teacher_layers = teacher_layers
        self.student_layers = student_layers
        self.rec_t = FeatureRecorder(self.teacher, teacher_layers, key=keys['teacher_layers'], detach=True) \
            if teacher_layers else None
        self.rec_s = FeatureRecorder(student, student_layers, key=keys['student_layers']) if student_layers else None
        self.pair_losses = nn.ModuleList(pair_losses or [])
        self.output_loss = output_loss
        self.pixel_loss = pixel_loss
        self.upcycle = upcycle
        self._phase_hook = None

    def set_phase_hook(self, hook: Callable[[str], contextlib.AbstractContextManager] | None) -> None:
        """Time (or trace) the phases of an iteration: ``hook(name)`` is entered around each of
        ``teacher_forward``, ``student_forward``, ``kd_terms`` and, for MetaKD, ``meta_step`` (with
        ``student_forward``, ``kd_terms``, ``autograd`` and ``autograd_create_graph`` inside it).
        None removes it. The computation is unchanged."""
        self._phase_hook = hook

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """The phase hook's context for ``name`` (a no-op without a hook)."""
        return self._phase_hook(name) if self._phase_hook is not None else contextlib.nullcontext()

    def train(self, mode: bool = True) -> 'Distiller':
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode whatever the caller does
        return self

    def set_student(self, student: nn.Module) -> None:
        """Use ``student`` (e.g. the DDP wrapper a framework put around the same bare network)."""
        if unwrap(student) is not unwrap(self.student):
            raise ValueError('set_student: not the same bare network the feature hooks are on')
        object.__setattr__(self, 'student', student)

    # ------------------------------------------------------------------ forwards and terms
    def needs_teacher(self) -> bool:
        return bool(self.teacher_layers) or self.output_loss is not None or self.upcycle is not None

    @torch.no_grad()
    def teacher_forward(self, lq: torch.Tensor) -> TeacherOutput:
        """Teacher output and features (no graph); ``(None, [])`` when no term uses them."""
        if not (self.teacher_layers or self.output_loss is not None):
            return None, []
        self.teacher.eval()
        with self.phase('teacher_forward'):
            if self.rec_t is not None:
                with self.rec_t:
                    out = self.teacher(lq)
                return out, self.rec_t.features()
            return self.teacher(lq), []

    def student_forward(self, lq: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None):
        """Student output and features (with graph). ``params``: run with these parameters instead
        (``torch.func.functional_call`` on the bare student; used by the meta step)."""
        net = self.student if params is None else unwrap(self.student)

        def run():
            return net(lq) if params is None else functional_call(net, dict(params), (lq,))

        with self.phase('student_forward'):
            if self.rec_s is None:
                return run(), []
            with self.rec_s:
                out = run()
            return out, self.rec_s.features()

    def pixel_terms(self, sr: torch.Tensor, gt: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        if self.pixel_loss is None:
            return OrderedDict()
        value = self.pixel_loss(sr, gt)
        if isinstance(value, Mapping):
            return OrderedDict((k, v) for k, v in value.items() if v is not None)
        return OrderedDict(l_pix=value)

    def kd_terms(self, out_s: torch.Tensor, feats_s: Sequence[torch.Tensor], out_t: torch.Tensor | None,
                 feats_t: Sequence[torch.Tensor], point_kwargs: Mapping | None = None) -> 'OrderedDict[str, torch.Tensor]':
        """Named KD loss terms: ``log_key`` of the loss or ``l_kd_<tag>``, summed over points, and ``l_kd_out``.
        ``point_kwargs``: keyword arguments for every per-point loss (e.g. MetaKD's ``texture``)."""
        terms: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
        per_key: dict[str, list] = {}
        with self.phase('kd_terms'):
            for loss, fs, ft in zip(self.pair_losses, feats_s, feats_t):
                name = getattr(loss, 'log_key', None) or f'l_kd_{getattr(loss, "tag", "feat")}'
                per_key.setdefault(name, []).append(loss(fs, ft, **(point_kwargs or {})))
            for name, values in per_key.items():
                terms[name] = torch.stack(values).sum()  # never torch.tensor([...]): it would cut the graph
            if self.output_loss is not None:
                terms['l_kd_out'] = self.output_loss(out_s, out_t)
        return terms

    def upcycled(self, lq: torch.Tensor, gt: torch.Tensor) -> Upcycled | None:
        """This batch's upcycled inputs with the teacher's outputs of them (None without upcycling)."""
        if self.upcycle is None:
            return None
        self.teacher.eval()
        with self.phase('teacher_forward'):
            return self.upcycle.teach(self.teacher, self.upcycle.inputs(lq, gt))

    def upcycle_terms(self, upcycled: Upcycled, params: Mapping[str, torch.Tensor] | None = None):
        """The upcycling terms of the student (with ``params`` when given: the meta step's virtual student)."""
        net = self.student if params is None else unwrap(self.student)

        def student(x):
            return net(x) if params is None else functional_call(net, dict(params), (x, ))

        with self.phase('kd_terms'):
            return self.upcycle.terms(student, upcycled)

    def loss(self, lq: torch.Tensor, gt: torch.Tensor, teacher: TeacherOutput | None = None,
             params: Mapping[str, torch.Tensor] | None = None, point_kwargs: Mapping | None = None,
             upcycled: Upcycled | None = None):
        """Student objective ``L_pix + sum of KD terms`` on a batch: ``(total, terms, sr)``.

        ``teacher``: ``(out_t, feats_t)`` computed before (e.g. cached); default a teacher forward.
        ``params``: evaluate the student with these parameters (meta step). ``point_kwargs``: see
        :meth:`kd_terms`. ``upcycled``: add the upcycling terms of this batch (:meth:`upcycled`).
        """
        out_t, feats_t = teacher if teacher is not None else self.teacher_forward(lq)
        sr, feats_s = self.student_forward(lq, params)
        terms = self.pixel_terms(sr, gt)
        terms.update(self.kd_terms(sr, feats_s, out_t, feats_t, point_kwargs))
        if upcycled is not None:
            terms.update(self.upcycle_terms(upcycled, params))
        if not terms:
            raise ValueError('Distiller: the objective has no term (set a pixel loss or a KD loss)')
        return torch.stack(list(terms.values())).sum(), terms, sr

    # ------------------------------------------------------------------ parameters
    def kd_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the KD losses (FitNet regressors): stepped with the student."""
        return [p for p in self.pair_losses.parameters() if p.requires_grad]

    def trained_kd_parameters(self) -> list[nn.Parameter]:
        """Training-only parameters that the student objective trains (outside any DDP wrapper)."""
        return self.kd_parameters()

    def grad_inputs(self) -> list[torch.Tensor]:
        """What the student objective is differentiated for: the student's trainable parameters
        and :meth:`trained_kd_parameters`."""
        own = [p for p in unwrap(self.student).parameters() if p.requires_grad]
        return own + self.trained_kd_parameters()

    def backward(self, loss: torch.Tensor, optimizer=None) -> None:
        """Backward of the student objective into :meth:`grad_inputs` only (through the
        optimizer's own ``backward`` when it has one, e.g. mmengine's ``OptimWrapper`` for AMP).
        Under ``torch.distributed`` the training-only parameters' gradients are averaged over
        ranks (the student's are averaged by its DDP wrapper)."""
        inputs = self.grad_inputs()
        if optimizer is not None and hasattr(optimizer, 'backward'):
            optimizer.backward(loss, inputs=inputs)
        else:
            loss.backward(inputs=inputs)
        average_over_ranks([p.grad for p in self.trained_kd_parameters() if p.grad is not None])

    def broadcast_parameters(self) -> None:
        """Under ``torch.distributed``: give every rank rank 0's training-only parameters (at start)."""
        if world_size() > 1:
            for p in self.parameters():
                torch.distributed.broadcast(p.data, src=0)

    # ------------------------------------------------------------------ the iteration
    def student_step(self, lq: torch.Tensor, gt: torch.Tensor, optimizer, teacher: TeacherOutput,
                     extra_optimizer=None, point_kwargs: Mapping | None = None,
                     upcycled: Upcycled | None = None) -> StepResult:
        """Zero grads, objective, backward, and ``optimizer.step()`` (and ``extra_optimizer.step()``
        when given) only if the loss and every gradient are finite. ``point_kwargs``: see :meth:`kd_terms`;
        ``upcycled``: the upcycling terms join the objective."""
        optimizer.zero_grad(set_to_none=True)
        if extra_optimizer is not None:
            extra_optimizer.zero_grad(set_to_none=True)
        total, terms, sr = self.loss(lq, gt, teacher, point_kwargs=point_kwargs, upcycled=upcycled)
        logs, skipped = self._step(total, terms, optimizer, extra_optimizer, hooks=True)
        return StepResult(logs, skipped, sr.detach())

    def upcycle_step(self, upcycled: Upcycled, optimizer) -> StepResult:
        """The reference DUKD's second optimizer step (``upcycle_opt.steps: 2``): the upcycling terms alone."""
        optimizer.zero_grad(set_to_none=True)
        terms = self.upcycle_terms(upcycled)
        total = torch.stack(list(terms.values())).sum()
        logs, skipped = self._step(total, terms, optimizer, None, hooks=False)
        logs['l_total_upcycle'] = logs.pop('l_total')
        return StepResult(logs, skipped and f'upcycling step: {skipped}')

    def _step(self, total: torch.Tensor, terms: Mapping[str, torch.Tensor], optimizer, extra_optimizer=None,
              hooks: bool = True):
        """Backward and step when the loss and every gradient are finite: ``(logs, skipped)``."""
        logs = OrderedDict(l_total=total.detach())
        logs.update((k, v.detach()) for k, v in terms.items())
        skipped = None
        if not all_finite([total]):
            bad = [k for k, v in terms.items() if not all_finite([v])]
            skipped = f'non-finite student loss ({", ".join(bad) or "l_total"})'
        else:
            pending = self._before_backward(total) if hooks else None
            self.backward(total, optimizer)
            if all_finite([p.grad for p in self.grad_inputs()]):
                optimizer.step()
                if extra_optimizer is not None:
                    extra_optimizer.step()
                if hooks:
                    self._after_step(optimizer, pending)
            else:
                skipped = 'non-finite student gradients'
        if skipped is not None:
            optimizer.zero_grad(set_to_none=True)
            if extra_optimizer is not None:
                extra_optimizer.zero_grad(set_to_none=True)
        return logs, skipped

    def _before_backward(self, total: torch.Tensor):
        """Subclass hook: called with the finite student objective before its backward (its graph
        is still there); what it returns is passed to :meth:`_after_step`. Default: nothing."""
        return None

    def _after_step(self, optimizer, pending) -> None:
        """Subclass hook: called after the student step was taken. Default: nothing."""

    def train_step(self, lq: torch.Tensor, gt: torch.Tensor, optimizer, *, teacher: TeacherOutput | None = None,
                   it: int | None = None, upcycled: Upcycled | None = None) -> StepResult:
        """One iteration: teacher forward (unless ``teacher`` is given), objective, backward, step.

        ``optimizer`` holds the student's parameters and :meth:`kd_parameters`. ``it`` is unused
        here (MetaKD's meta schedule reads it). With upcycling, ``upcycled`` (e.g. from a cache)
        or :meth:`upcycled`; ``steps: 2`` takes the reference's second step on its terms.
        """
        teacher = teacher if teacher is not None else self.teacher_forward(lq)
        if self.upcycle is not None and upcycled is None:
            upcycled = self.upcycled(lq, gt)
        if self.upcycle is None or self.upcycle.options.steps == 1:
            return self.student_step(lq, gt, optimizer, teacher, upcycled=upcycled)
        step = self.student_step(lq, gt, optimizer, teacher)
        return merge_steps(step, self.upcycle_step(upcycled, optimizer))

    def remove_hooks(self) -> None:
        for rec in (self.rec_t, self.rec_s):
            if rec is not None:
                rec.remove()
