"""Feature capture by forward hooks on dotted module names (torch only).

Architectures are never edited: a :class:`FeatureRecorder` hooks ``named_modules()`` of the
bare network (DataParallel / DistributedDataParallel are unwrapped) and records the outputs
of the named modules while it is active::

    rec = FeatureRecorder(student, ['body.3', 'conv_after_body'])
    with rec:
        out = student(lq)
    feats = rec.features()   # [tensor of body.3, tensor of conv_after_body]
    rec.remove()

Token outputs (``B x L x C``, as in SwinIR's residual groups) are reshaped to ``B x C x H x W``
when the module was called with an ``(H, W)`` size argument (SwinIR's ``x_size``); other
non-4D outputs are rejected with a message naming the module.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ['FeatureRecorder', 'unwrap', 'resolve_module', 'nearest_names', 'as_feature_map']


def unwrap(net: nn.Module) -> nn.Module:
    """Return the bare module under DataParallel / DistributedDataParallel wrappers."""
    while isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    return net


def nearest_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest valid module names to ``name`` (for error messages)."""
    candidates = [c for c in candidates if c]
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not close:  # fall back to names sharing the first component
        head = name.split('.')[0]
        close = [c for c in candidates if c.split('.')[0] == head][:n]
    return close


def resolve_module(net: nn.Module, name: str, key: str = 'module name') -> nn.Module:
    """Return ``net``'s sub-module called ``name`` or raise a KeyError listing the nearest names.

    Args:
        net: a (possibly wrapped) network.
        name: dotted name from ``named_modules()`` of the bare network.
        key: what to call the name in the error (e.g. the YAML key ``kd.student_layers``).
    """
    modules = dict(unwrap(net).named_modules())
    if name in modules and name != '':
        return modules[name]
    near = nearest_names(name, modules.keys())
    hint = f' Nearest valid names: {near}.' if near else ''
    raise KeyError(f'{key}: {unwrap(net).__class__.__name__} has no module named {name!r}.{hint} '
                   f'Run tools/list_modules.py on your option file to see all names and output shapes.')


def as_feature_map(name: str, module: nn.Module, args: tuple, output) -> torch.Tensor:
    """``output`` of module ``name`` as a ``B x C x H x W`` map (SwinIR-style tokens reshaped with the
    ``(H, W)`` size argument); raises for outputs that are no feature map."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not torch.is_tensor(output):
        raise TypeError(f'Module {name!r} ({module.__class__.__name__}) returns {type(output).__name__}, '
                        'not a tensor; hook a module that returns a feature map.')
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        size = next((a for a in args if isinstance(a, (tuple, list)) and len(a) == 2
                     and all(isinstance(v, int) for v in a)), None)
        if size is not None and size[0] * size[1] == output.shape[1]:
            b, _, c = output.shape
            return output.transpose(1, 2).reshape(b, c, size[0], size[1])
        raise ValueError(f'Module {name!r} ({module.__class__.__name__}) returns tokens of shape '
                         f'{tuple(output.shape)} and no (H, W) size argument to reshape them into a map. '
                         'Hook a module whose output is B x C x H x W (for SwinIR: layers.<i> or '
                         'conv_after_body).')
    raise ValueError(f'Module {name!r} ({module.__class__.__name__}) returns a {output.dim()}-D tensor of shape '
                     f'{tuple(output.shape)}; distillation points must return B x C x H x W maps.')


class FeatureRecorder:
    """Record outputs of named sub-modules during forward passes.

    Hooks are attached once at construction; they store outputs only while the recorder is
    active (inside ``with recorder:``), so validation and inference passes record nothing.
    Entering the context clears the previous iteration's features.

    Args:
        net: the network (wrappers are removed).
        names: dotted module names from ``named_modules()`` of the bare network.
        key: the option key the names came from, used in error messages.
        detach: store detached tensors (for a teacher run under ``no_grad`` this is free).
    """

    def __init__(self, net: nn.Module, names: Sequence[str], key: str = 'layers', detach: bool = False):
        self.names = list(names)
        self.key = key
        self.detach = detach
        self.active = False
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        bare = unwrap(net)
        for name in self.names:
            module = resolve_module(bare, name, key)
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module, args, output):
            if not self.active:
                return
            feat = as_feature_map(name, module, args, output)
            self._store[name] = feat.detach() if self.detach else feat
        return hook

    def __enter__(self) -> 'FeatureRecorder':
        self.clear()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def clear(self) -> None:
        """Drop stored features (and the graphs they hold)."""
        self._store.clear()

    def features(self) -> list[torch.Tensor]:
        """Recorded features in the order of ``names``; raises if a module did not run."""
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(f'{self.key}: modules {missing} did not run in the recorded forward pass '
                               '(are they used by forward()?)')
        return [self._store[n] for n in self.names]

    def remove(self) -> None:
        """Remove all hooks; the recorder records nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
        self.active = False

    @property
    def num_handles(self) -> int:
        return len(self._handles)
