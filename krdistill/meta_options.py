"""MetaKD's ``meta:`` options: defaults, choices and the one check (pure Python).

:func:`check_meta_options` runs once, when the algorithm is built
(:func:`krdistill.build.build_metakd`); everything after it reads the resulting
:class:`MetaOptions`. Errors name the YAML key; a key that was removed says what replaced it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from .option_checks import check_keys

__all__ = ['MetaOptions', 'META_DEFAULTS', 'REMOVED_META_KEYS', 'REMOVED_KRNET_KEYS', 'check_meta_options',
           'check_removed', 'check_number']


@dataclasses.dataclass(frozen=True)
class MetaOptions:
    """A checked ``meta:`` block. The defaults are the recommended method (README).

    Attributes:
        every: a meta step every ``every`` iterations.
        mode: ``exact`` (second order through the virtual step) or ``finite_difference`` (DARTS;
            first order, less memory) for the kernels' one-step meta gradient.
        update: ``meta`` (the KRNets learn from the meta objective), ``frozen`` (kept as
            initialised: the control) or ``joint`` (trained on the student objective: the ablation).
        objective: ``horizon`` (the branch weights by online hypergradients through the student's
            real optimizer trajectory, the rest of the KRNets by the one-step meta gradient; needs
            FitNet-branch KRNets) or ``one_step`` (every KRNet parameter by the one-step meta gradient).
        virtual_step: ``optimizer``: the virtual step is the step the student's optimizer would take.
        fd_eps: the finite-difference radius (``mode: finite_difference``).
        horizon_decay: trace memory, ``1 / (1 - decay)`` steps.
        horizon_stride: the branch terms' gradients every ``stride``-th student step (times stride).
        horizon_terms: ``one`` branch term per sampled step in turn (times their number) or ``all``.
        start: meta-learning starts after iteration ``start``; until then the run is the KRNets
            frozen at initialisation.
    """
    every: int = 16
    mode: str = 'exact'
    update: str = 'meta'
    objective: str = 'horizon'
    virtual_step: str = 'optimizer'
    fd_eps: float = 1e-3
    horizon_decay: float = 0.99
    horizon_stride: int = 4
    horizon_terms: str = 'one'
    start: int = 0


#: the defaults as a dict (a ``meta:`` block with every key)
META_DEFAULTS = dataclasses.asdict(MetaOptions())
_CHOICES = dict(mode=('exact', 'finite_difference'), update=('meta', 'joint', 'frozen'),
                objective=('one_step', 'horizon'), virtual_step=('optimizer', ), horizon_terms=('all', 'one'))
#: removed keys (and removed values) -> what replaced them; the last commit that had them: 43f4d11
REMOVED_META_KEYS = {
    'inner_lr': 'the virtual step is the student optimizer\'s own step (its lr from train.optim_g and the '
                'scheduler): delete the key',
    'precond': 'the virtual step is the student optimizer\'s own step (Adam\'s preconditioning included): '
               'delete the key',
    'adapters': 'the KRNet adapters are meta-learned (a FitNet branch\'s regressor is trained on the student '
                'objective): delete the key',
    'teacher_weight': 'the meta objective is the student\'s pixel loss on the meta batch: delete the key',
}
REMOVED_VALUES = {('virtual_step', 'plain'): 'virtual_step: optimizer (the student optimizer\'s own step)'}
#: removed ``network_kr`` keys -> what replaced them
REMOVED_KRNET_KEYS = {
    'gain': 'fitnet_branch: true (its learned texture weight b_tex is the texture strength): delete the key',
}


def _number_error(key: str, value: Any, what: str) -> ValueError:
    hint = ''
    if isinstance(value, str):
        hint = (f' (it was read as the string {value!r}: YAML 1.1 reads 1e-4 as a string; write it with a dot '
                'and a sign, e.g. 1.0e-4)')
    return ValueError(f'{key}: must be {what}, got {value!r}{hint}')


def check_number(value: Any, key: str, *, minimum: float | None = None, exclusive: bool = False,
                 integer: bool = False) -> float | int:
    """Validate one numeric option; the error names ``key`` (and explains YAML's ``1e-4`` string)."""
    ok_type = (int, ) if integer else (int, float)
    what = 'an integer' if integer else 'a number'
    if minimum is not None:
        what += f' {">" if exclusive else ">="} {minimum:g}'
    if isinstance(value, bool) or not isinstance(value, ok_type) or value != value:  # NaN != NaN
        raise _number_error(key, value, what)
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        raise _number_error(key, value, what)
    return value


def check_removed(block: Mapping, key: str, removed: Mapping[str, str]) -> None:
    """A removed key is an error that says what replaced it (never silently reinterpreted)."""
    for k in block:
        if k in removed:
            raise KeyError(f'{key}.{k}: removed; {removed[k]}')


def check_meta_options(meta: Mapping | MetaOptions | None, key: str = 'meta',
                       extra_keys: Sequence[str] = ()) -> MetaOptions:
    """The checked :class:`MetaOptions` of a ``meta:`` block (missing keys: the defaults); errors
    name ``<key>.<name>``. ``extra_keys`` are allowed and ignored (a front end's own keys)."""
    if isinstance(meta, MetaOptions):
        return meta
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f'{key}: must be a mapping of {sorted(META_DEFAULTS)}, got {type(meta).__name__}')
    check_removed(meta or {}, key, REMOVED_META_KEYS)
    check_keys(meta or {}, (*META_DEFAULTS, *extra_keys), key)
    meta = {k: v for k, v in (meta or {}).items() if k not in extra_keys}
    out = dict(META_DEFAULTS, **meta)
    for k, choices in _CHOICES.items():
        if (k, out[k]) in REMOVED_VALUES:
            raise ValueError(f'{key}.{k}: {out[k]!r} was removed; use {REMOVED_VALUES[k, out[k]]}')
        if out[k] not in choices:
            raise ValueError(f'{key}.{k}: must be one of {list(choices)}, got {out[k]!r}')
    check_number(out['every'], f'{key}.every', minimum=1, integer=True)
    check_number(out['fd_eps'], f'{key}.fd_eps', minimum=0, exclusive=True)
    check_number(out['horizon_decay'], f'{key}.horizon_decay', minimum=0)
    check_number(out['horizon_stride'], f'{key}.horizon_stride', minimum=1, integer=True)
    check_number(out['start'], f'{key}.start (the last iteration before meta-learning starts)', minimum=0,
                 integer=True)
    if out['horizon_decay'] > 1:
        raise ValueError(f'{key}.horizon_decay: must be in [0, 1] (1 / (1 - decay) steps of memory), '
                         f'got {out["horizon_decay"]!r}')
    return MetaOptions(**out)
