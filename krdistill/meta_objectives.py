"""What trains MetaKD's KRNets: one object per choice of ``meta.update`` / ``meta.objective`` (torch only).

:func:`make_objective` picks one when the algorithm is built. Each owns its state (the horizon
traces) and its part of the iteration, which :class:`~krdistill.metakd.MetaKD` runs:

- :meth:`Objective.meta_step` on meta iterations: set ``.grad`` of the KRNet parameters it meta-learns;
- :meth:`Objective.student_texture`: what the KRNets compute in the student step (``texture`` of
  :meth:`KRNet.forward <krdistill.archs.krnet_arch.KRNet.forward>`);
- :meth:`Objective.before_backward` / :meth:`Objective.after_step` around the student step.

=========================  =================================================================
``update: frozen``         :class:`Frozen`: the KRNets stay as initialised (the control)
``update: joint``          :class:`Joint`: the KRNets train on the student objective (ablation)
``objective: one_step``    :class:`OneStep`: the one-step meta gradient for every meta-learned parameter
``objective: horizon``     :class:`Horizon`: the branch weights by online hypergradients through the
                           student's optimizer trajectory, the rest by the one-step meta gradient
=========================  =================================================================
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .distiller import TeacherOutput, average_over_ranks, unwrap_optimizer, world_size
from .features import unwrap
from .meta import HorizonTrace, meta_gradient, optimizer_step
from .meta_options import MetaOptions

__all__ = ['Objective', 'Frozen', 'Joint', 'OneStep', 'Horizon', 'make_objective']

Logs = 'OrderedDict[str, torch.Tensor]'


class Objective:
    """The KRNets frozen at initialisation (``meta.update: frozen``); the base of the others.

    Args:
        mkd: the :class:`~krdistill.metakd.MetaKD` whose KRNets this trains.
        options: its checked ``meta:`` options.
    """

    #: whether meta iterations run :meth:`meta_step`
    meta_learns = False

    def __init__(self, mkd, options: MetaOptions):
        self.mkd = mkd
        self.options = options

    def student_trained(self) -> list[nn.Parameter]:
        """KRNet parameters the student objective trains at every iteration: FitNet regressors."""
        return [p for kr in self.mkd.krnets for p in kr.student_trained_parameters() if p.requires_grad]

    def meta_parameters(self) -> list[nn.Parameter]:
        """KRNet parameters the meta objective trains (none here)."""
        return []

    def student_texture(self, started: bool) -> str:
        """The KRNets' texture mode in the student step: leave the maps out at ``b_tex = 0``."""
        return 'skip_zero'

    def meta_step(self, lq: torch.Tensor, gt: torch.Tensor, teacher: TeacherOutput, optimizer,
                  upcycled=None) -> tuple[Logs, list]:
        """Set ``.grad`` of :meth:`meta_parameters`; returns ``(logs, tensors that must be finite)``.
        ``upcycled``: the batch's upcycling data, whose terms are part of the student objective."""
        raise RuntimeError(f'{type(self).__name__} takes no meta step')

    def before_backward(self, total: torch.Tensor) -> Any:
        """Called with the finite student objective before its backward (after meta.start)."""
        return None

    def after_step(self, optimizer, pending: Any) -> None:
        """Called after the student step was taken, with what :meth:`before_backward` returned."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping, device=None) -> None:
        pass


Frozen = Objective


class Joint(Objective):
    """``meta.update: joint``: every KRNet parameter trained on the student objective (an ablation:
    the KRNets then minimise the texture loss they define)."""

    def student_trained(self) -> list[nn.Parameter]:
        return self.mkd.kr_parameters()

    def student_texture(self, started: bool) -> str:
        return 'weighted'  # b_tex is trained on the student objective: its gradient is used


class OneStep(Objective):
    """``meta.objective: one_step``: ``d L_meta(theta'(phi)) / d phi`` with ``theta'`` the step the
    student's optimizer would take on the current batch (:func:`krdistill.meta.optimizer_step`) and
    ``L_meta = L_pix(S_theta'(x_m), y_m)`` on the meta batch (:meth:`MetaKD.meta_batch`)."""

    meta_learns = True
    #: the KRNets' texture mode in the virtual step's student loss
    texture = 'weighted'

    def meta_parameters(self) -> list[nn.Parameter]:
        trained = {id(p) for p in self.student_trained()}
        return [p for p in self.mkd.kr_parameters() if id(p) not in trained]

    def one_step_parameters(self) -> list[nn.Parameter]:
        """What the one-step meta gradient trains."""
        return self.meta_parameters()

    def meta_step(self, lq, gt, teacher, optimizer, upcycled=None):
        lq_m, gt_m = self.mkd.meta_batch(lq, gt)
        logs = self.meta_grad(lq, gt, lq_m, gt_m, teacher, optimizer, upcycled)
        return logs, [logs['l_meta']] + [p.grad for p in self.one_step_parameters()]

    def meta_grad(self, lq: torch.Tensor, gt: torch.Tensor, lq_meta: torch.Tensor, gt_meta: torch.Tensor,
                  teacher: TeacherOutput | None = None, student_optimizer=None, upcycled=None) -> Logs:
        """Set ``.grad`` of :meth:`one_step_parameters` to the one-step meta gradient. The student is
        not changed; under ``torch.distributed`` the virtual step uses the global-batch gradient and
        the KRNet gradients are averaged over ranks. Returns ``l_meta``, ``meta_grad_norm``, ``t_meta``."""
        t0 = time.perf_counter()
        mkd = self.mkd
        if student_optimizer is None:
            raise ValueError('meta.virtual_step: optimizer needs the student optimizer')
        bare = unwrap(mkd.student)
        params = self.one_step_parameters()
        point = {'texture': self.texture}
        with mkd.phase('meta_step'):
            teacher = teacher if teacher is not None else mkd.teacher_forward(lq)
            step_fn = optimizer_step(unwrap_optimizer(student_optimizer), bare.named_parameters())

            def student_loss(theta):
                return mkd.loss(lq, gt, teacher, theta, point_kwargs=point, upcycled=upcycled)[0]

            def meta_loss(theta):
                return mkd.meta_criterion(functional_call(bare, theta, (lq_meta, )), gt_meta)

            grads, info = meta_gradient(mkd.student, student_loss, meta_loss, params, lr=0.0, mode=self.options.mode,
                                        fd_eps=self.options.fd_eps, step_fn=step_fn, phase=mkd.phase,
                                        reduce=_differentiable_mean if world_size() > 1 else None)
            average_over_ranks(grads)
            for p, g in zip(params, grads):
                p.grad = g
        return OrderedDict(l_meta=info['l_meta'], meta_grad_norm=info['grad_norm'],
                           t_meta=torch.tensor(time.perf_counter() - t0))


class Horizon(OneStep):
    """``meta.objective: horizon``: the FitNet branch weights (``b_tex``, and ``b_fit`` when learned)
    get online hypergradients ``<grad_theta L_meta(theta_t), z_k>`` through the student's real
    optimizer trajectory (:class:`~krdistill.meta.HorizonTrace`; ``horizon_decay`` forgets,
    ``horizon_stride: r`` samples the branch terms' gradients every r-th step, ``horizon_terms:
    one`` one term per sampled step in turn); the rest of the KRNets keeps the one-step meta
    gradient, taken with the texture term at unit weight (so the kernels learn while ``b_tex = 0``)."""

    texture = 'unit'

    def __init__(self, mkd, options: MetaOptions):
        super().__init__(mkd, options)
        if not self.branch_weights():
            raise ValueError('meta.objective: horizon meta-learns the branch weights of KRNets built with '
                             'network_kr.fitnet_branch: true (b_tex, and b_fit unless learn_fitnet_weight is '
                             'false); these KRNets have none')
        names = [n for n, p in unwrap(mkd.student).named_parameters() if p.requires_grad]
        self.trace = HorizonTrace(names, len(self.branch_weights()), options.horizon_decay)
        self.steps = 0  # student steps seen by the traces (the stride's phase)

    def branch_weights(self) -> list[tuple[str, nn.Parameter]]:
        return self.mkd.branch_weights()

    def one_step_parameters(self) -> list[nn.Parameter]:
        lams = {id(p) for _, p in self.branch_weights()}
        return [p for p in self.meta_parameters() if id(p) not in lams]

    def meta_step(self, lq, gt, teacher, optimizer, upcycled=None):
        mkd = self.mkd
        if mkd.has_meta_data():  # the branch weights' credit over the trajectory, on an unseen batch
            lq_h, gt_h = mkd.meta_batch(lq, gt)
        else:  # the current batch: the student has not stepped on it yet
            lq_h, gt_h = lq, gt
        logs = self.horizon_grad(lq_h, gt_h)
        checked = [logs['l_meta_horizon']] + [p.grad for _, p in self.branch_weights()]
        if self.one_step_parameters():
            one, more = super().meta_step(lq, gt, teacher, optimizer, upcycled)
            logs.update(one)
            checked += more
        return logs, checked

    def horizon_grad(self, lq_meta: torch.Tensor, gt_meta: torch.Tensor) -> Logs:
        """Set ``.grad`` of :meth:`branch_weights` to their hypergradients, ``L_meta`` at the student's
        current parameters on ``(lq_meta, gt_meta)``. Returns ``l_meta_horizon`` and, per weight,
        ``<name>_credit`` (``-`` the hypergradient: > 0 means the term helped over the horizon)."""
        bare = unwrap(self.mkd.student)
        named = [(n, p) for n, p in bare.named_parameters() if p.requires_grad]
        with self.mkd.phase('meta_step'):
            loss = self.mkd.meta_criterion(bare(lq_meta), gt_meta)
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
            average_over_ranks(grads)
            hyper = self.trace.hypergradient({n: g for (n, _), g in zip(named, grads)})
            out = OrderedDict(l_meta_horizon=loss.detach())
            for (name, p), h in zip(self.branch_weights(), hyper):
                p.grad = h.to(device=p.device, dtype=p.dtype).reshape(p.shape)
                out[f'{name}_credit'] = -h.detach().float()
        return out

    def student_texture(self, started: bool) -> str:
        # a step the traces sample needs d L_S / d b_tex: the texture maps then stay in
        sampled = started and self.steps % self.options.horizon_stride == 0
        return 'weighted' if sampled else 'skip_zero'

    def before_backward(self, total: torch.Tensor):
        """``grad_theta`` of each branch's term (``d L_S / d lambda_k``), for the trace of the step."""
        if not torch.is_grad_enabled():
            return None
        self.steps += 1
        stride = self.options.horizon_stride
        if (self.steps - 1) % stride:
            return {'grads': None, 'scale': 0.0}  # not sampled at this step: the traces still advance
        lams = [p for _, p in self.branch_weights()]
        named = [(n, p) for n, p in unwrap(self.mkd.student).named_parameters() if p.requires_grad]
        terms = torch.autograd.grad(total, lams, create_graph=True, allow_unused=True)
        # horizon_terms: one -- one branch term per sampled step, in turn, times their number: the
        # traces stay unbiased and a sampled step costs one backward however many points there are
        pick = None
        if self.options.horizon_terms == 'one' and len(lams) > 1:
            pick = ((self.steps - 1) // stride) % len(lams)
        out = []
        for k, a in enumerate(terms):
            if a is None or not a.requires_grad or (pick is not None and k != pick):
                out.append({})
                continue
            g = torch.autograd.grad(a, [p for _, p in named], retain_graph=True, allow_unused=True)
            g = [x if pick is None or x is None else x * len(lams) for x in g]
            average_over_ranks([x for x in g if x is not None])
            out.append({n: x.detach() for (n, _), x in zip(named, g) if x is not None})
        return {'grads': out, 'scale': float(stride)}

    def after_step(self, optimizer, pending) -> None:
        if pending is not None:
            bare = unwrap(self.mkd.student)
            self.trace.update(unwrap_optimizer(optimizer), dict(bare.named_parameters()), pending['grads'],
                              scale=pending['scale'])

    def state_dict(self) -> dict:
        return {'horizon': dict(self.trace.state_dict(), steps=self.steps)}

    def load_state_dict(self, state: Mapping, device=None) -> None:
        if state.get('horizon') is not None:
            self.trace.load_state_dict(state['horizon'], device)
            self.steps = int(state['horizon'].get('steps', 0))


def make_objective(mkd, options: MetaOptions) -> Objective:
    """The objective ``meta.update`` and ``meta.objective`` choose."""
    if options.update == 'frozen':
        return Frozen(mkd, options)
    if options.update == 'joint':
        return Joint(mkd, options)
    return Horizon(mkd, options) if options.objective == 'horizon' else OneStep(mkd, options)


def _differentiable_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Differentiable mean over ranks (the virtual step then uses the global-batch gradient)."""
    from torch.distributed.nn.functional import all_reduce
    world = torch.distributed.get_world_size()
    return [all_reduce(t.contiguous()) / world for t in tensors]
