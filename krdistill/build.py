"""Build a :class:`~krdistill.distiller.Distiller` or :class:`~krdistill.metakd.MetaKD` from the
option blocks of an option file (the one builder every front end uses; torch only).

The option blocks are those of the BasicSR YAML (``network_kr``, ``train.texture_opt``,
``train.output_kd_opt``, ``train.pixel_opt``, ``train.kd_opt``, ``meta``). A ``type`` is looked
up by ``resolve(kind, name)``, ``kind`` being ``'arch'`` or ``'loss'``: BasicSR's registries by
default when basicsr is installed (with BasicSR's own name resolution, e.g. the ``_basicsr``
suffix), else the local tables :data:`ARCHS` / :data:`LOSSES`; the mmengine front end passes a
resolver that asks mmengine's ``MODELS`` first. Every type may also be a class, and every loss a
ready module. Channel counts of the distillation points come from one dummy forward.
"""
from __future__ import annotations

import copy
import functools
import importlib
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .archs.krnet_arch import KRNet
from .distiller import Distiller, probe
from .features import unwrap
from .losses.kd_loss import ATLoss, FAKDLoss, FitNetLoss, OutputKDLoss, PixelLoss
from .losses.texture_loss import TextureWiseLoss
from .meta_options import REMOVED_KRNET_KEYS, check_meta_options, check_number, check_removed
from .metakd import MetaKD
from .option_checks import check_keys, signature_keys
from .upcycle import Upcycler

__all__ = ['ARCHS', 'LOSSES', 'OPTIMIZERS', 'default_resolver', 'build_module', 'build_optimizer',
           'build_distiller', 'build_metakd', 'plain', 'probe_pairs', 'BASICSR_KEYS']

#: ``network_kr.type`` -> class (torch-only table)
ARCHS: dict[str, type] = {'KRNet': KRNet}
#: loss ``type`` -> class (torch-only table; the pixel losses match BasicSR's arithmetic)
LOSSES: dict[str, Callable] = {
    'TextureWiseLoss': TextureWiseLoss, 'OutputKDLoss': OutputKDLoss, 'FitNetLoss': FitNetLoss, 'ATLoss': ATLoss,
    'FAKDLoss': FAKDLoss, 'L1Loss': functools.partial(PixelLoss, 'l1'), 'MSELoss': functools.partial(PixelLoss, 'l2'),
    'CharbonnierLoss': functools.partial(PixelLoss, 'charbonnier')}
#: ``optim_*.type`` -> optimizer class
OPTIMIZERS: dict[str, type] = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}


def plain(opt: Any) -> Any:
    """A deep copy with mappings turned into dicts (mmengine ``ConfigDict`` included)."""
    if isinstance(opt, Mapping):
        return {k: plain(v) for k, v in opt.items()}
    if isinstance(opt, (list, tuple)) and not hasattr(opt, '_fields'):
        return type(opt)(plain(v) for v in opt)
    return copy.deepcopy(opt)


def _basicsr_registry(kind: str):
    try:
        importlib.import_module('basicsr')
    except ModuleNotFoundError as e:
        if e.name != 'basicsr':
            raise
        return None
    registry = importlib.import_module('basicsr.utils.registry')  # optional: only when basicsr is installed
    return {'arch': registry.ARCH_REGISTRY, 'loss': registry.LOSS_REGISTRY}[kind]


def default_resolver(kind: str, name: str):
    """BasicSR's registry (``Registry.get``, its own name resolution) when basicsr is installed,
    else the local tables. Returns None when the name is unknown."""
    registry = _basicsr_registry(kind)
    if registry is not None:
        try:
            return registry.get(name)
        except KeyError:
            return None
    return {'arch': ARCHS, 'loss': LOSSES}[kind].get(name)


def _known(kind: str) -> list[str]:
    registry = _basicsr_registry(kind)
    names = sorted(registry._obj_map) if registry is not None else sorted({'arch': ARCHS, 'loss': LOSSES}[kind])
    return names[:15] + (['...'] if len(names) > 15 else [])


def build_module(opt: Any, kind: str, key: str, resolve: Callable | None = None, allow_instance: bool = True,
                 **filled: Any) -> Any:
    """Build ``opt`` (``{'type': name_or_class, **kwargs}``, or a bare class) for option key ``key``.

    With ``allow_instance`` a module or other callable is returned unchanged (bring your own loss).
    ``filled``: keyword arguments read from the networks (``s_channels``, ``t_channels``), passed
    only to classes that accept them; setting them in ``opt`` is an error.
    """
    if isinstance(opt, type):
        opt = {'type': opt}
    if not isinstance(opt, Mapping):
        if allow_instance and callable(opt):
            return opt
        what = 'a mapping with a "type" key' + (' or a module' if allow_instance else '')
        raise TypeError(f'{key}: expected {what}, got {type(opt).__name__}')
    opt = plain(opt)
    typ = opt.pop('type', None)
    if isinstance(typ, str):
        cls = (resolve or default_resolver)(kind, typ)
        if cls is None:
            raise KeyError(f'{key}.type: {typ!r} is not a registered {kind} (known: {_known(kind)})')
    elif callable(typ):
        cls = typ
    else:
        raise KeyError(f'{key}.type: missing or invalid ({typ!r})')
    for k in filled:
        if k in opt:
            raise KeyError(f'{key}.{k}: do not set it; it is read from the networks')
    params = signature_keys(cls)
    if params is not None:
        check_keys(opt, params, key)  # before the numbers: a misspelled key names its nearest key
    if 'loss_weight' in opt:
        check_number(opt['loss_weight'], f'{key}.loss_weight', minimum=0)
    kwargs = {k: v for k, v in filled.items() if params is None or k in params}
    try:
        return cls(**opt, **kwargs)
    except TypeError as e:
        raise TypeError(f'{key}: cannot build {getattr(cls, "__name__", cls)} from {opt}: {e}') from e


def build_optimizer(opt: Mapping | None, params: Sequence[nn.Parameter] | Sequence[dict], key: str = 'optim_kr'):
    """``torch.optim`` optimizer from ``{'type': 'Adam' | 'AdamW' | 'SGD' | class, 'lr': ..., ...}``;
    every number is validated and errors name ``key``."""
    if not isinstance(opt, Mapping):
        raise TypeError(f'{key}: must be a mapping like {{type: Adam, lr: 1.0e-4}}, got {opt!r}')
    opt = plain(dict(opt))
    typ = opt.pop('type', None)
    cls = OPTIMIZERS.get(typ) if isinstance(typ, str) else typ
    if not isinstance(cls, type):
        raise NotImplementedError(f'{key}.type: {typ!r} is not supported; use one of {sorted(OPTIMIZERS)}')
    known = signature_keys(cls, skip=('self', 'params'))
    if known is not None:
        check_keys(opt, known, key)
    if 'lr' not in opt:
        raise KeyError(f'{key}.lr: required')
    check_number(opt['lr'], f'{key}.lr', minimum=0)
    for k in ('weight_decay', 'momentum', 'eps'):
        if k in opt:
            check_number(opt[k], f'{key}.{k}', minimum=0)
    if 'betas' in opt:
        betas = opt['betas']
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f'{key}.betas: must be two numbers in [0, 1), got {betas!r}')
        for i, b in enumerate(betas):
            check_number(b, f'{key}.betas[{i}]', minimum=0)
            if b >= 1:
                raise ValueError(f'{key}.betas[{i}]: must be < 1, got {b!r}')
        opt['betas'] = tuple(betas)
    try:
        return cls(params, **opt)
    except (TypeError, ValueError) as e:
        raise type(e)(f'{key}: cannot build {cls.__name__} from {opt}: {e}') from e


def _device_of(net: nn.Module) -> torch.device:
    for t in itertools.chain(unwrap(net).parameters(), unwrap(net).buffers()):
        return t.device
    return torch.device('cpu')


def _first_in_channels(net: nn.Module, default: int = 3) -> int:
    for m in unwrap(net).modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return default


def probe_pairs(teacher: nn.Module, student: nn.Module, teacher_layers: Sequence[str], student_layers: Sequence[str],
                example_input: torch.Tensor | None = None, keys: Mapping[str, str] | None = None) -> dict:
    """One dummy forward of each network: module names exist, scales agree, channels known.

    Returns ``{'teacher': [feature shapes], 'student': [...], 'scale': s}``.
    """
    keys = {'teacher_layers': 'teacher_layers', 'student_layers': 'student_layers', **(keys or {})}
    device = _device_of(student)
    if example_input is None:
        gen = torch.Generator().manual_seed(0)  # leave the caller's RNG stream alone
        example_input = torch.rand(1, _first_in_channels(student), 16, 16, generator=gen)
    param = next(iter(unwrap(student).parameters()), None)
    example_input = example_input.to(device, param.dtype if param is not None and param.is_floating_point() else None)
    out_t, shapes_t = _probe_one(teacher, teacher_layers, example_input, keys['teacher_layers'],
                                 keys.get('teacher', 'teacher'))
    out_s, shapes_s = _probe_one(student, student_layers, example_input, keys['student_layers'],
                                 keys.get('student', 'student'))
    if out_t[-2:] != out_s[-2:]:
        raise ValueError(f'scale mismatch: on a {tuple(example_input.shape)} input the teacher gives {out_t} and the '
                         f'student {out_s}; teacher and student must upscale alike')
    if out_t[1] != out_s[1]:
        raise ValueError(f'channel mismatch: on a {tuple(example_input.shape)} input the teacher gives {out_t[1]}-'
                         f'channel images and the student {out_s[1]}-channel ones; set {keys.get("teacher", "teacher")}'
                         f'.num_out_ch / {keys.get("student", "student")}.num_out_ch alike')
    return dict(teacher=shapes_t, student=shapes_s, scale=out_s[-1] // example_input.shape[-1], channels=out_s[1])


def _probe_one(net: nn.Module, layers: Sequence[str], lq: torch.Tensor, layers_key: str, net_key: str):
    """:func:`~krdistill.distiller.probe`; a forward that fails names the network's option key."""
    try:
        return probe(net, layers, lq, key=layers_key)
    except RuntimeError as e:
        raise RuntimeError(f'{net_key}: one dummy forward on a {tuple(lq.shape)} LR input failed before training '
                           f'(check {net_key}.num_in_ch and the other sizes of {net_key}): {e}') from e


def _pairs(teacher_layers, student_layers, keys) -> tuple[list[str], list[str]]:
    out = []
    for key, names in ((keys['teacher_layers'], teacher_layers), (keys['student_layers'], student_layers)):
        names = [names] if isinstance(names, str) else list(names or [])
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f'{key}: must be a list of module names, got {names!r}')
        out.append(names)
    if len(out[0]) != len(out[1]):
        raise ValueError(f'{keys["teacher_layers"]} ({len(out[0])} names) and {keys["student_layers"]} '
                         f'({len(out[1])} names) must pair up one to one')
    return out[0], out[1]


#: option names in error messages: the argument names by default ...
DEFAULT_KEYS = dict(teacher='teacher', student='student', teacher_layers='teacher_layers',
                    student_layers='student_layers', network_kr='network_kr',
                    texture_opt='texture_opt', output_kd_opt='output_kd_opt', pixel_opt='pixel_opt',
                    kd_opt='kd_opt', meta='meta', upcycle_opt='upcycle_opt')
#: ... and the YAML keys for BasicSR option files
BASICSR_KEYS = dict(teacher='network_t', student='network_g', teacher_layers='kd.teacher_layers',
                    student_layers='kd.student_layers', network_kr='network_kr',
                    texture_opt='train.texture_opt', output_kd_opt='train.output_kd_opt', pixel_opt='train.pixel_opt',
                    kd_opt='train.kd_opt', meta='meta', upcycle_opt='train.upcycle_opt')


def build_distiller(teacher: nn.Module | None, student: nn.Module, teacher_layers: Sequence[str] = (),
                    student_layers: Sequence[str] = (), *, kd_opt: Mapping | None = None,
                    output_kd_opt: Mapping | None = None, pixel_opt: Any = None, example_input=None,
                    resolve: Callable | None = None, keys: Mapping[str, str] | None = None,
                    shapes: dict | None = None, upcycle_opt: Mapping | None = None) -> Distiller:
    """A hand-crafted :class:`~krdistill.distiller.Distiller`: ``kd_opt`` per distillation point
    (features are recorded only when it is set), ``output_kd_opt`` on the outputs, ``pixel_opt``
    (a loss block, a callable, or None for no pixel term), ``upcycle_opt`` DUKD's data upcycling
    (:mod:`krdistill.upcycle`). ``shapes``: a :func:`probe_pairs` result already computed; without it,
    every run with a teacher makes one dummy forward of both networks (scales and output channels
    agree, before the first step)."""
    keys = {**DEFAULT_KEYS, **(keys or {})}
    tl, sl = _pairs(teacher_layers, student_layers, keys)
    pair_losses = []
    if kd_opt:
        if not sl:
            raise ValueError(f'{keys["kd_opt"]} is set but {keys["student_layers"]} / {keys["teacher_layers"]} '
                             'are empty')
        shapes = shapes or probe_pairs(teacher, student, tl, sl, example_input, keys)
        pair_losses = [build_module(kd_opt, 'loss', keys['kd_opt'], resolve, s_channels=ss[1], t_channels=ts[1])
                       for ss, ts in zip(shapes['student'], shapes['teacher'])]
    else:
        tl, sl = [], []  # record features only when a per-point loss uses them
    output_loss = build_module(output_kd_opt, 'loss', keys['output_kd_opt'], resolve) if output_kd_opt else None
    pixel_loss = build_module(pixel_opt, 'loss', keys['pixel_opt'], resolve) if pixel_opt is not None else None
    if shapes is None and teacher is not None and (output_loss is not None or upcycle_opt is not None):
        shapes = probe_pairs(teacher, student, [], [], example_input, keys)  # scale and channels, before step 1
    upcycle = _upcycler(upcycle_opt, teacher, student, shapes, example_input, keys)
    uses_teacher = tl or output_loss is not None or upcycle is not None
    return Distiller(teacher if uses_teacher else None, student, tl, sl, pair_losses=pair_losses,
                     output_loss=output_loss, pixel_loss=pixel_loss, keys=keys, upcycle=upcycle).to(_device_of(student))


def _upcycler(upcycle_opt, teacher, student, shapes, example_input, keys) -> Upcycler | None:
    """The :class:`~krdistill.upcycle.Upcycler` of ``upcycle_opt`` (None when not set); the scale
    from ``shapes`` or one dummy forward of both networks."""
    if upcycle_opt is None:
        return None
    if teacher is None:
        raise ValueError(f'{keys["upcycle_opt"]}: data upcycling needs a teacher (network_t)')
    scale = (shapes or probe_pairs(teacher, student, [], [], example_input, keys))['scale']
    return Upcycler(plain(upcycle_opt), scale, keys['upcycle_opt'])


def build_metakd(teacher: nn.Module, student: nn.Module, teacher_layers: Sequence[str],
                 student_layers: Sequence[str], *, network_kr: Mapping | None = None,
                 texture_opt: Mapping | nn.Module | None = None, output_kd_opt: Mapping | nn.Module | None = None,
                 pixel_opt: Any = None, meta: Mapping | None = None, meta_data: Iterable | None = None,
                 example_input=None, resolve: Callable | None = None, keys: Mapping[str, str] | None = None,
                 shapes: dict | None = None, upcycle_opt: Mapping | None = None,
                 meta_loss: Callable | None = None) -> MetaKD:
    """:class:`~krdistill.metakd.MetaKD` from the option blocks (defaults: ``KRNet``,
    ``TextureWiseLoss``, L1 pixel loss, no output KD, :class:`~krdistill.meta_options.MetaOptions`).
    ``meta`` is checked here, once; errors name the YAML key (``keys``). ``meta_loss``: the meta
    objective's criterion when it is not the pixel loss (:class:`~krdistill.metakd.MetaKD`).
    One KRNet per distillation point; ``s_channels`` / ``t_channels`` read from the networks."""
    keys = {**DEFAULT_KEYS, **(keys or {})}
    tl, sl = _pairs(teacher_layers, student_layers, keys)
    if not sl:
        raise ValueError(f'{keys["student_layers"]} / {keys["teacher_layers"]}: MetaKD needs at least one '
                         'distillation point')
    meta = check_meta_options(plain(meta) if meta is not None else None, keys['meta'])  # the one check
    kr_opt = network_kr if network_kr is not None else {'type': 'KRNet'}
    if isinstance(kr_opt, Mapping):
        check_removed(kr_opt, keys['network_kr'], REMOVED_KRNET_KEYS)
    shapes = shapes or probe_pairs(teacher, student, tl, sl, example_input, keys)
    krnets = [build_module(kr_opt, 'arch', keys['network_kr'], resolve, allow_instance=False, s_channels=ss[1],
                           t_channels=ts[1]) for ss, ts in zip(shapes['student'], shapes['teacher'])]
    texture_loss = build_module(texture_opt if texture_opt is not None else {'type': 'TextureWiseLoss'}, 'loss',
                                keys['texture_opt'], resolve)
    output_loss = build_module(output_kd_opt, 'loss', keys['output_kd_opt'], resolve) if output_kd_opt else None
    pixel_loss = build_module(pixel_opt if pixel_opt is not None else {'type': 'L1Loss', 'loss_weight': 1.0}, 'loss',
                              keys['pixel_opt'], resolve)
    upcycle = _upcycler(upcycle_opt, teacher, student, shapes, example_input, keys)
    return MetaKD(teacher, student, tl, sl, krnets, texture_loss=texture_loss, pixel_loss=pixel_loss,
                  output_loss=output_loss, meta=meta, meta_data=meta_data, keys=keys,
                  upcycle=upcycle, meta_loss=meta_loss).to(_device_of(student))
