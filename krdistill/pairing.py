"""Distillation points chosen automatically (``kd: auto``), torch only.

Every SR network of interest has a *body*: a container whose children are repeated blocks that
keep the LR feature map's size (EDSR/MSRResNet ``body.<i>``, RCAN's residual groups, RRDBNet's
RRDBs, SwinIR's ``layers.<i>`` (tokens, reshaped to maps), ECBSR's ``backbone.<i>``,
SRVGGNetCompact's body convs). :func:`body_points` finds it from one dummy forward: among
the containers with at least two children of one type (or a Sequential / ModuleList of one) whose outputs are maps of one shape, the
one whose repeated blocks hold the most modules (the body covers most of the network; ties: the
shallower container). :func:`auto_pairs` then pairs ``N`` teacher and student points by relative
depth, the end of each of ``N`` equal segments of both bodies (``N = 1``: the end of both
bodies). Paired maps must have the same spatial size, or sizes an integer factor apart (a
pixel-unshuffled body such as RRDBNet's at x2; the losses resize the teacher map).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import nn

from .features import as_feature_map, unwrap  # the token -> map rule of the recorder

__all__ = ['body_points', 'auto_pairs', 'format_pairs']


@torch.no_grad()
def _module_outputs(net: nn.Module, lq: torch.Tensor) -> dict[str, tuple]:
    """``name -> (order, map shape)`` of every module whose output is (or reshapes to) a 4-D map."""
    bare = unwrap(net)
    seen: dict[str, tuple] = {}
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            try:
                shape = tuple(as_feature_map(name, module, args, output).shape)
            except (TypeError, ValueError):
                return
            if name not in seen:
                seen[name] = (len(seen), shape)
        return hook

    for name, module in bare.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook_for(name)))
    was_training = bare.training
    try:
        bare.eval()
        bare(lq)
    finally:
        for h in handles:
            h.remove()
        bare.train(was_training)
    return seen


def body_points(net: nn.Module, lq: torch.Tensor, key: str = 'network') -> list[tuple[str, tuple]]:
    """The body's blocks of ``net`` in forward order: ``[(module name, map shape), ...]``."""
    outputs = _module_outputs(net, lq)
    bare = unwrap(net)
    best, best_score = None, (0, 0)
    for cname, container in bare.named_modules():
        children = [(f'{cname}.{n}' if cname else n, m) for n, m in container.named_children()]
        kinds = Counter(type(m).__name__ for n, m in children if n in outputs)
        if not kinds:
            continue
        kind, _ = kinds.most_common(1)[0]
        shapes = Counter(outputs[n][1] for n, m in children if n in outputs and type(m).__name__ == kind)
        shape, count = shapes.most_common(1)[0]
        blocks = [m for n, m in children if n in outputs and type(m).__name__ == kind and outputs[n][1] == shape]
        depth = cname.count('.') + (1 if cname else 0)
        score = (sum(1 + sum(1 for _ in m.modules()) for m in blocks), -depth)
        repeated = count >= 2 or isinstance(container, (nn.Sequential, nn.ModuleList))  # a 1-block body
        if repeated and score > best_score:
            best_score = score
            best = sorted(((n, outputs[n][1]) for n, m in children
                           if n in outputs and type(m).__name__ == kind and outputs[n][1] == shape),
                          key=lambda item: outputs[item[0]][0])
    if best is None:
        raise ValueError(f'kd: auto: found no body of repeated blocks in {key} ({type(bare).__name__}); name the '
                         'points yourself (kd.teacher_layers / kd.student_layers; tools/list_modules.py lists them)')
    return best


def auto_pairs(teacher: nn.Module, student: nn.Module, points: int = 1, lq: torch.Tensor | None = None,
               ) -> list[tuple[str, str, tuple, tuple]]:
    """``points`` (teacher name, student name, teacher shape, student shape) pairs by relative depth.

    Raises a clear error when the bodies cannot give that many pairs of matching spatial size.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f'kd.points: must be an integer >= 1, got {points!r}')
    if lq is None:
        lq = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    device = next(iter(unwrap(student).parameters())).device
    lq = lq.to(device)
    t_body = body_points(teacher, lq, 'network_t')
    s_body = body_points(student, lq, 'network_g')
    if points > min(len(t_body), len(s_body)):
        raise ValueError(f'kd.points: {points} points asked, but the teacher body has {len(t_body)} blocks and the '
                         f'student body {len(s_body)}')
    pairs = []
    for k in range(1, points + 1):
        tn, ts = t_body[round(k * len(t_body) / points) - 1]
        sn, ss = s_body[round(k * len(s_body) / points) - 1]
        if not _compatible(ts[-2:], ss[-2:]):
            raise ValueError(f'kd: auto: teacher {tn} gives {ts[-2]}x{ts[-1]} maps but student {sn} gives '
                             f'{ss[-2]}x{ss[-1]}; no compatible pair. Name the points yourself '
                             '(kd.teacher_layers / kd.student_layers)')
        pairs.append((tn, sn, ts, ss))
    return pairs


def _compatible(a: tuple, b: tuple) -> bool:
    big, small = (a, b) if a[0] >= b[0] else (b, a)
    return all(x % y == 0 for x, y in zip(big, small)) and big[0] // small[0] == big[1] // small[1]


def format_pairs(pairs: Sequence[tuple]) -> str:
    """One line per pair: ``teacher name (C x H x W) -> student name (C x H x W)``."""
    def shape(s):
        return 'x'.join(str(v) for v in s[1:])
    return '\n'.join(f'  {tn} ({shape(ts)}) -> {sn} ({shape(ss)})' for tn, sn, ts, ss in pairs)
