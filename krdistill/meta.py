r"""The MetaKD meta update, framework-free (torch only).

Reconstructed from the abstract of Zhu, Liu, Chen, arXiv 2207.08356 ("the KRNets are optimized
in a meta-learning manner"); design note docs/METAKD.md, section "Meta update". With student
parameters :math:`\theta`, KRNet parameters :math:`\phi` and step size :math:`\alpha`:

.. math::

    \theta' = \theta - \alpha\, \nabla_\theta L_S(\theta, \phi), \qquad
    \nabla_\phi L_{meta}(\theta'(\phi)), \quad L_{meta}(\theta') = L_{pix}(S_{\theta'}(x_m), y_m)

or, with ``step_fn`` (what MetaKD uses), :math:`\theta'` the step the student's optimizer would take
(:func:`optimizer_step`). The Adam / SGD state maths lives in one place, :func:`optimizer_state`,
read by :func:`optimizer_step` and :class:`HorizonTrace`.

* ``mode='exact'``: second order, autograd through the virtual step (``create_graph``).
* ``mode='finite_difference'`` (DARTS, Liu et al. 2019): with :math:`u = \nabla_{\theta'}
  L_{meta}(\theta')` (through ``step_fn``: :math:`(\partial\theta' / \partial g)^T` of it) and
  :math:`\epsilon = \mathrm{fd\_eps} / \|u\|`,

  .. math::

      \nabla_\phi L_{meta} \approx -\alpha\, \frac{\nabla_\phi L_S(\theta + \epsilon u, \phi)
      - \nabla_\phi L_S(\theta - \epsilon u, \phi)}{2 \epsilon}

  (no double-backward memory; DARTS' formula).

The student is evaluated through closures that take a ``{name: tensor}`` dict of the bare
student's parameters (names as in ``unwrap(student).named_parameters()``, no ``module.``
prefix), typically with :func:`torch.func.functional_call`::

    bare = unwrap(student)

    def student_loss(params):                  # L_S(theta, phi); the KRNets live in the closure
        with recorder:                         # forward hooks still fire under functional_call
            out = functional_call(bare, params, (lq,))
        kr_out = krnet(recorder.features()[0], feat_t)      # feat_t detached
        return l_pix(out, gt) + texture_wise_loss(kr_out['tex_s'], kr_out['tex_t'], kr_out['weights'])

    def meta_loss(params):                     # L_meta(theta'), no teacher term
        return l_pix(functional_call(bare, params, (lq_meta,)), gt_meta)

    grads, info = meta_gradient(student, student_loss, meta_loss, list(krnet.parameters()), lr=alpha)
    for p, g in zip(krnet.parameters(), grads):
        p.grad = g
    optimizer_kr.step()

The student's parameters, their ``.grad`` and its buffers are left exactly as they were: the
virtual step lives only in the dicts handed to the closures (buffers changed by the virtual
forward passes, e.g. BatchNorm running statistics, are restored). Student parameters that do
not require grad are passed through unchanged.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .features import unwrap

__all__ = ['virtual_step', 'meta_gradient', 'optimizer_state', 'student_params', 'optimizer_step', 'grads_or_zeros',
           'SUPPORTED_OPTIMIZERS', 'HorizonTrace']

ParamDict = dict[str, Tensor]
Loss = Callable[[ParamDict], Tensor]
_MODES = ('exact', 'finite_difference')


def student_params(student: nn.Module) -> ParamDict:
    """The bare student's parameters by name (wrappers removed); what the closures receive."""
    return dict(unwrap(student).named_parameters())


def virtual_step(params: Mapping[str, Tensor],
                 grads: Mapping[str, Tensor | None],
                 lr: float) -> ParamDict:
    r"""One virtual SGD step, out of place: ``theta' = theta - lr * g``.

    Args:
        params: ``{name: theta}``; never modified.
        grads: ``{name: g}``, same shapes; names missing or mapped to None are not stepped.
        lr: step size ``alpha``.

    Returns:
        A new dict with every name of ``params``; stepped entries are new tensors (they carry
        the graph of ``params`` and ``grads``), the others are the very same objects.
    """
    out: ParamDict = {}
    for name, p in params.items():
        g = grads.get(name)
        if g is None:
            out[name] = p
            continue
        if g.shape != p.shape:
            raise ValueError(f'virtual_step: gradient of {name!r} has shape {tuple(g.shape)}, '
                             f'parameter has {tuple(p.shape)}.')
        out[name] = p - lr * g
    return out


#: optimizers whose step :func:`optimizer_step` reproduces (subclasses included)
SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
StepFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], ParamDict]


def _value(x) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


def optimizer_state(optimizer: torch.optim.Optimizer, group: Mapping, state: Mapping) -> dict:
    """One parameter's hyper-parameters and state in a supported optimizer, as plain values and
    detached tensors: ``kind`` (``adam`` | ``sgd``), ``lr``, ``wd``, ``maximize`` and, for Adam /
    AdamW, ``beta1``, ``beta2``, ``eps``, ``step`` (0 without state), ``decoupled``, ``amsgrad``,
    ``m``, ``v``, ``vmax`` (None without state); for SGD ``momentum``, ``dampening``, ``nesterov``,
    ``buf``. The one reading of optimizer state: :func:`optimizer_step` and :class:`HorizonTrace` use it."""
    plan = dict(lr=_value(group['lr']), wd=float(group.get('weight_decay', 0.0)),
                maximize=bool(group.get('maximize', False)))
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
        beta1, beta2 = (_value(b) for b in group['betas'])
        plan.update(kind='adam', beta1=beta1, beta2=beta2, eps=float(group['eps']),
                    step=_value(state['step']) if 'step' in state else 0.0,
                    decoupled=bool(group.get('decoupled_weight_decay', isinstance(optimizer, torch.optim.AdamW))),
                    amsgrad=bool(group.get('amsgrad', False)),
                    m=state['exp_avg'].detach() if 'exp_avg' in state else None,
                    v=state['exp_avg_sq'].detach() if 'exp_avg_sq' in state else None,
                    vmax=state['max_exp_avg_sq'].detach() if 'max_exp_avg_sq' in state else None)
    else:
        buf = state.get('momentum_buffer')
        plan.update(kind='sgd', momentum=float(group.get('momentum', 0.0)),
                    dampening=float(group.get('dampening', 0.0)), nesterov=bool(group.get('nesterov', False)),
                    buf=buf.detach() if buf is not None else None)
    return plan


def optimizer_step(optimizer: torch.optim.Optimizer,
                   named_params: Union[Mapping[str, Tensor], Iterable[tuple[str, Tensor]]],
                   key: str = 'train.optim_g') -> StepFn:
    r"""The step ``optimizer.step()`` would take, as a function ``(params, grads) -> params'``.

    Out of place and differentiable in ``grads`` (and ``params``), with the optimizer's current
    state (moments, step counts, momentum buffers) and hyper-parameters read once, as constants.
    For Adam / AdamW (``amsgrad``, ``maximize``, coupled or decoupled weight decay):

    .. math::
        m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
        \theta' = \theta - \frac{lr}{1-\beta_1^{t+1}} \frac{m'}{\sqrt{v'/(1-\beta_2^{t+1})} + \epsilon}

    (``m = v = t = 0`` for a parameter without state yet); for SGD with momentum ``mu``,
    dampening and Nesterov: ``b' = mu b + (1 - dampening) g`` (``b' = g`` without a buffer),
    ``theta' = theta - lr (g + mu b')`` or ``theta - lr b'``. So the virtual step of the meta
    objective is the step the student really takes next, momentum and bias corrections included
    (a plain ``lr * g`` is about ``1 / (1 - beta1)`` times the part the current gradient causes).

    Raises a clear error naming ``key`` for any other optimizer.
    """
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise NotImplementedError(
            f'{key}.type: {type(optimizer).__name__} is not supported: the meta step takes the student '
            f'optimizer\'s own step (meta.virtual_step: optimizer), reproduced for '
            f'{[c.__name__ for c in SUPPORTED_OPTIMIZERS]}; use one of those')
    items = list(named_params.items()) if isinstance(named_params, Mapping) else list(named_params)
    group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
    plans: dict[str, dict] = {}
    for name, p in items:
        group = group_of.get(id(p))
        if group is None:
            continue  # not stepped by this optimizer: left unchanged
        plan = optimizer_state(optimizer, group, optimizer.state.get(p, {}))
        plan['t'] = plan.get('step', 0.0) + 1.0  # (Adam) the step about to be taken
        plans[name] = plan

    def step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None]) -> ParamDict:
        out: ParamDict = {}
        for name, p in params.items():
            g, plan = grads.get(name), plans.get(name)
            if g is None or plan is None:
                out[name] = p
                continue
            if g.shape != p.shape:
                raise ValueError(f'optimizer_step: gradient of {name!r} has shape {tuple(g.shape)}, '
                                 f'parameter has {tuple(p.shape)}.')
            if plan['maximize']:
                g = -g
            lr, wd = plan['lr'], plan['wd']
            if plan['kind'] == 'adam':
                base = p
                if wd != 0:
                    if plan['decoupled']:
                        base = p * (1 - lr * wd)
                    else:
                        g = g + wd * p
                b1, b2, t = plan['beta1'], plan['beta2'], plan['t']
                m = (1 - b1) * g if plan['m'] is None else b1 * plan['m'] + (1 - b1) * g
                v = (1 - b2) * g * g if plan['v'] is None else b2 * plan['v'] + (1 - b2) * g * g
                if plan['amsgrad']:
                    v = v if plan['vmax'] is None else torch.maximum(plan['vmax'], v)
                # clamp: where v = 0 (g = 0 on the first step) sqrt has an infinite derivative and the
                # meta gradient would be NaN; the value changes by < 1e-19, the step there is 0 anyway
                denom = v.clamp_min(torch.finfo(v.dtype).tiny).sqrt() / math.sqrt(1 - b2**t) + plan['eps']
                out[name] = base - (lr / (1 - b1**t)) * m / denom
            else:
                if wd != 0:
                    g = g + wd * p
                mu = plan['momentum']
                if mu != 0:
                    b = g if plan['buf'] is None else mu * plan['buf'] + (1 - plan['dampening']) * g
                    g = g + mu * b if plan['nesterov'] else b
                out[name] = p - lr * g
        return out

    return step


def grads_or_zeros(loss: Tensor, inputs: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    """``d loss / d inputs`` with zeros for inputs the loss does not use."""
    if not inputs:
        return []
    gs = torch.autograd.grad(loss, list(inputs), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def _check_scalar(value, what: str) -> Tensor:
    if not torch.is_tensor(value) or value.numel() != 1:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f'meta_gradient: {what} must return a scalar tensor, got {shape}.')
    if not value.requires_grad:
        raise RuntimeError(f'meta_gradient: {what} does not depend on the parameters it was given '
                           '(no graph); evaluate the student with functional_call(bare_student, params, ...).')
    return value.reshape(())


def meta_gradient(student: nn.Module,
                  student_loss: Loss,
                  meta_loss: Loss,
                  kr_params: Sequence[Tensor],
                  lr: float,
                  mode: str = 'exact',
                  fd_eps: float = 1e-3,
                  reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
                  step_fn: StepFn | None = None,
                  phase: Callable[[str], contextlib.AbstractContextManager] | None = None,
                  ) -> tuple[list[Tensor], dict[str, Tensor]]:
    r"""Gradient of the meta loss after a virtual student step w.r.t. the KRNet parameters.

    Args:
        student: the student network (DataParallel / DDP wrappers are removed; only the bare
            module's parameters are read). It is never modified.
        student_loss: ``params -> L_S(theta, phi)``, a scalar; ``params`` is a full
            ``{name: tensor}`` dict of the bare student's parameters. The KRNet parameters
            ``phi`` enter through the closure.
        meta_loss: ``params -> L_meta``, a scalar, evaluated at the virtual parameters.
        kr_params: the parameters ``phi`` to differentiate (e.g. ``list(krnet.parameters())``).
        lr: virtual step size ``alpha`` (normally the student's current learning rate).
        mode: ``'exact'`` (second order, default) or ``'finite_difference'`` (DARTS).
        fd_eps: finite-difference radius in parameter space, relative to the direction's norm
            (``eps = fd_eps / ||u||``, as DARTS). Default 1e-3: on a small float64 problem it is
            0.1-2% off the exact meta gradient; DARTS' 0.01 was 16-21% off.
        step_fn: the virtual step as a function ``(params, grads) -> params'`` (e.g.
            :func:`optimizer_step`, the student optimizer's real step); replaces ``lr``.
        reduce: data parallelism: averages a list of per-rank tensors over ranks (e.g. with
            ``torch.distributed.nn.functional.all_reduce``, which is differentiable). Applied to
            the student gradient of the virtual step (inside the graph in ``exact`` mode) and, in
            ``finite_difference`` mode, to ``grad_theta' L_meta``, so every rank takes the same
            virtual step as one process with the global batch. The caller still averages the
            returned ``grads`` over ranks.
        phase: optional timing hook, ``phase(name)`` a context manager entered around every
            autograd call (``autograd_create_graph`` or ``autograd``).

    Cost: ``exact`` calls ``student_loss`` once (with a double backward) and ``meta_loss``
    once; ``finite_difference`` calls ``student_loss`` three times and ``meta_loss`` once, with
    first-order backward passes only. The closures must be deterministic across calls (same
    batches, no dropout or random augmentation inside), or the differences are noise.

    Returns:
        ``(grads, info)``: ``grads`` aligned with ``kr_params`` (zeros where ``phi`` does not
        reach ``L_meta``); ``info`` holds detached scalars ``l_student`` (``L_S`` at
        ``theta``), ``l_meta`` (at ``theta'``), ``grad_norm`` (of ``grads``) and, for
        finite differences, ``fd_step`` (the ``eps`` used).
    """
    if mode not in _MODES:
        raise ValueError(f'meta_gradient: mode must be one of {_MODES}, got {mode!r}.')
    if mode == 'finite_difference' and not fd_eps > 0:
        raise ValueError(f'meta_gradient: fd_eps must be > 0, got {fd_eps!r}.')
    kr_params = list(kr_params)
    bare = unwrap(student)
    params = dict(bare.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    buffers = {n: b.detach().clone() for n, b in bare.named_buffers()}

    def grads_fn(loss, inputs, create_graph=False):
        if phase is None:
            return grads_or_zeros(loss, inputs, create_graph)
        with phase('autograd_create_graph' if create_graph else 'autograd'):
            return grads_or_zeros(loss, inputs, create_graph)

    try:
        if step_fn is None:
            def step_fn(theta, g, lr=lr):
                return virtual_step(theta, g, lr)
            plain = True
        else:
            plain = False
        if mode == 'exact':
            grads, info = _exact(params, names, student_loss, meta_loss, kr_params, step_fn, reduce, grads_fn)
        else:
            grads, info = _finite_difference(params, names, student_loss, meta_loss, kr_params, lr, fd_eps,
                                             reduce, None if plain else step_fn, grads_fn)
    finally:
        if buffers:
            with torch.no_grad():
                for n, b in bare.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
    # Same layout as the parameters (autograd may return transposed strides): ready for
    # ``p.grad = g`` and for all_reduce, which needs dense tensors.
    grads = [g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, kr_params)]
    with torch.no_grad():
        info['grad_norm'] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
            if grads else torch.zeros(())
    return grads, info


def _leaves(params: Mapping[str, Tensor], names: Sequence[str]) -> ParamDict:
    """Params with the trainable ones replaced by detached leaf copies (the real ones stay out of any graph)."""
    out = dict(params)
    for n in names:
        out[n] = params[n].detach().requires_grad_(True)
    return out


def _exact(params, names, student_loss, meta_loss, kr_params, step_fn, reduce=None, grads_or_zeros=grads_or_zeros):
    theta = _leaves(params, names)
    l_s = _check_scalar(student_loss(theta), 'student_loss')
    g = grads_or_zeros(l_s, [theta[n] for n in names], create_graph=True)
    if reduce is not None:
        g = list(reduce(g))
    theta_v = step_fn(theta, dict(zip(names, g)))
    l_m = _check_scalar(meta_loss(theta_v), 'meta_loss')
    grads = [x.detach() for x in grads_or_zeros(l_m, kr_params)]
    return grads, {'l_student': l_s.detach(), 'l_meta': l_m.detach()}


def _finite_difference(params, names, student_loss, meta_loss, kr_params, lr, fd_eps, reduce=None,
                       step_fn=None, grads_or_zeros=grads_or_zeros):
    theta = _leaves(params, names)
    l_s = _check_scalar(student_loss(theta), 'student_loss')
    g = [x.detach() for x in grads_or_zeros(l_s, [theta[n] for n in names])]
    if reduce is not None:
        g = [x.detach() for x in reduce(g)]
    with torch.no_grad():
        stepped = virtual_step({n: theta[n].detach() for n in names}, dict(zip(names, g)), lr) \
            if step_fn is None else step_fn({n: theta[n].detach() for n in names}, dict(zip(names, g)))
    theta_v = dict(params)
    theta_v.update({n: stepped[n].requires_grad_(True) for n in names})
    l_m = _check_scalar(meta_loss(theta_v), 'meta_loss')
    v = grads_or_zeros(l_m, [theta_v[n] for n in names])
    if reduce is not None:
        v = [x.detach() for x in reduce(v)]
    scale = -lr
    if step_fn is not None:
        # Chain rule through theta' = step(theta, g): the direction is (d theta' / d g)^T v.
        g_leaf = [x.detach().requires_grad_(True) for x in g]
        with torch.enable_grad():
            out = step_fn({n: theta[n].detach() for n in names}, dict(zip(names, g_leaf)))
            dot = torch.stack([(out[n] * x).sum() for n, x in zip(names, v)]).sum()
        u_list = grads_or_zeros(dot, g_leaf)
        scale = 1.0
    with torch.no_grad():
        # Chain rule through theta' = theta - lr * g: the direction is u = v (times -lr).
        u = dict(zip(names, v)) if step_fn is None else dict(zip(names, u_list))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in u.values()])) \
            if u else torch.zeros(())
    if not kr_params:
        return [], {'l_student': l_s.detach(), 'l_meta': l_m.detach(), 'fd_step': torch.zeros(())}
    if float(norm) == 0.0:  # L_meta is flat in theta: the meta gradient is exactly zero
        return [torch.zeros_like(p) for p in kr_params], \
            {'l_student': l_s.detach(), 'l_meta': l_m.detach(), 'fd_step': torch.zeros(())}
    eps = fd_eps / norm
    side = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            shifted = dict(params)
            shifted.update({n: params[n].detach() + sign * eps * u[n] for n in names})
        side.append(grads_or_zeros(_check_scalar(student_loss(shifted), 'student_loss'), kr_params))
    grads = [(scale / (2 * eps)) * (gp - gm) for gp, gm in zip(*side)]
    return [x.detach() for x in grads], {'l_student': l_s.detach(), 'l_meta': l_m.detach(), 'fd_step': eps.detach()}


# ============================================================================ long-horizon credit
class HorizonTrace:
    r"""Online hypergradients of a few loss-weight scalars through the student's real optimizer
    trajectory (the ``meta.objective: horizon`` of :class:`~krdistill.metakd.MetaKD`).

    With student objective ``L_S = ... + sum_k lambda_k L_k``, forward-mode tangents follow
    ``d theta_t / d lambda_k`` (``z_k``) and the optimizer state's (Adam: ``d m / d lambda_k``,
    ``d v / d lambda_k``; SGD: the momentum buffer's) along the steps the optimizer really takes.
    Dropped: the Hessian of ``L_S`` (the gradient's tangent is taken as ``g_k = grad_theta L_k``,
    not ``g_k + H z_k``), so the error grows with the step size and the horizon. Kept: momentum,
    bias corrections and Adam's normalisation (a term whose gradient is parallel to the rest moves
    Adam's step little, and the trace knows it). A forgetting factor ``decay`` gives an effective
    horizon of ``1 / (1 - decay)`` steps (the weights move; old steps say less about the current
    ones). Adam, with ``g`` the full gradient of the step and ``m, v`` its moments after it:

    .. math::
        \dot m \leftarrow \beta_1 \dot m + (1-\beta_1) g_k, \quad
        \dot v \leftarrow \beta_2 \dot v + 2 (1-\beta_2)\, g\, g_k, \quad
        z_k \leftarrow \mathrm{decay}\, z_k - \frac{lr_t}{1-\beta_1^t}
        \Big(\frac{\dot m}{d} - \frac{m\, \dot d}{d^2}\Big), \quad
        d = \sqrt{v / (1-\beta_2^t)} + \epsilon

    (SGD: ``u_k <- mu u_k + (1 - dampening) g_k``, ``z_k <- decay z_k - lr (g_k + mu u_k | u_k)``).
    The hypergradient of a meta loss at the current parameters is
    ``d L_meta / d lambda_k = <grad_theta L_meta(theta_t), z_k>``: the credit of term ``k`` over the
    last ~``1 / (1 - decay)`` steps, where the one-step objective sees only the next one.
    ``tests/test_meta_objective.py``: exact for SGD on objectives linear in ``theta``; through a
    nonlinear student's Adam trajectory, close to finite differences at small steps, the error
    growing with the step (the Hessian).

    Args:
        names: the student parameter names (as in ``named_parameters()`` of the bare student).
        num: number of scalars ``lambda``.
        decay: forgetting factor in ``[0, 1]``.
    """

    def __init__(self, names: Sequence[str], num: int, decay: float):
        self.names = list(names)
        self.num = int(num)
        self.decay = float(decay)
        self.u: list[dict[str, Tensor]] = [{} for _ in range(self.num)]  # d m / d lambda (SGD: d buf)
        self.w: list[dict[str, Tensor]] = [{} for _ in range(self.num)]  # d v / d lambda (Adam)
        self.z: list[dict[str, Tensor]] = [{} for _ in range(self.num)]  # d theta / d lambda

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer, named_params: Mapping[str, Tensor],
               term_grads: Sequence[Mapping[str, Tensor]] | None, key: str = 'meta.objective',
               scale: float = 1.0) -> None:
        """After ``optimizer.step()``: advance the traces with the step just taken.

        ``term_grads[k]``: ``{name: grad_theta L_k}`` at the parameters before the step, times
        ``scale`` (None: not computed at this step, taken as 0; with ``term_grads`` computed every
        ``r``-th step and ``scale = r`` the traces are an unbiased subsample); the step's full
        gradient is read from ``.grad`` (still set after the step).
        """
        if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
            raise NotImplementedError(f'{key}: horizon follows the steps of '
                                      f'{[c.__name__ for c in SUPPORTED_OPTIMIZERS]}, not {type(optimizer).__name__}')
        group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
        for name in self.names:
            p = named_params[name]
            group = group_of.get(id(p))
            state = optimizer.state.get(p, {})
            is_adam = isinstance(optimizer, torch.optim.Adam)
            if group is None or (is_adam and not state) or (not is_adam and p.grad is None):
                continue  # not stepped
            plan = optimizer_state(optimizer, group, state)  # after the step: its moments and count
            lr = plan['lr']
            sign = -1.0 if plan['maximize'] else 1.0
            if is_adam:
                b1, b2, t = plan['beta1'], plan['beta2'], plan['step']
                m, v = plan['m'], plan['v']  # (amsgrad: the max is taken as constant)
                vv = plan['vmax'] if plan['amsgrad'] else v
                bc2 = 1 - b2**t
                root = (vv / bc2).clamp_min(torch.finfo(vv.dtype).tiny).sqrt()
                denom = root + plan['eps']
                lr_bc = lr / (1 - b1**t)
                g_full = sign * p.grad if p.grad is not None else torch.zeros_like(p)
                if plan['wd'] and not plan['decoupled']:
                    g_full = g_full + plan['wd'] * p  # (approximately: p is after the step)
            else:
                b1 = plan['momentum']
            for k in range(self.num):
                g = term_grads[k].get(name) if term_grads is not None else None
                g = torch.zeros_like(p) if g is None else (sign * scale) * g
                u_old, z_old = self.u[k].get(name), self.z[k].get(name)
                if is_adam:
                    u = (1 - b1) * g if u_old is None else b1 * u_old + (1 - b1) * g
                    w_old = self.w[k].get(name)
                    w = 2 * (1 - b2) * g_full * g if w_old is None else b2 * w_old + 2 * (1 - b2) * g_full * g
                    if plan['amsgrad']:
                        w = torch.where(vv > v, torch.zeros_like(w), w)
                    self.w[k][name] = w
                    d_denom = (w / bc2) / (2 * root)
                    dz = -lr_bc * (u / denom - m * d_denom / denom**2)
                else:
                    damp = plan['dampening']
                    if b1 == 0:
                        u, d = g, g
                    else:
                        u = g.clone() if u_old is None else b1 * u_old + (1 - damp) * g
                        d = g + b1 * u if plan['nesterov'] else u
                    dz = -lr * d
                self.u[k][name] = u
                self.z[k][name] = dz if z_old is None else self.decay * z_old + dz

    def hypergradient(self, meta_grads: Mapping[str, Tensor]) -> Tensor:
        """``[<meta_grads, z_k>]_k``: a ``num`` vector (0 before the first step)."""
        out = []
        for k in range(self.num):
            acc = torch.zeros((), dtype=torch.float64)
            for name, z in self.z[k].items():
                g = meta_grads.get(name)
                if g is not None:
                    acc = acc + (g.double() * z.double()).sum().cpu()
            out.append(acc)
        return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)

    def state_dict(self) -> dict:
        def cpu(traces):
            return [{n: t.detach().cpu().clone() for n, t in d.items()} for d in traces]
        return {'decay': self.decay, 'u': cpu(self.u), 'w': cpu(self.w), 'z': cpu(self.z)}

    def load_state_dict(self, state: Mapping, device=None) -> None:
        if len(state['z']) != self.num:
            raise ValueError(f'HorizonTrace: the state has {len(state["z"])} traces, this run has {self.num}')
        self.u = [{n: t.to(device) for n, t in d.items()} for d in state['u']]
        self.w = [{n: t.to(device) for n, t in d.items()} for d in state.get('w', [{}] * self.num)]
        self.z = [{n: t.to(device) for n, t in d.items()} for d in state['z']]
