"""The benchmark's method blocks: the option-file blocks of :mod:`krdistill.build`, plus three protocol keys.

A method block (``methods.<name>`` of ``options/bench/*.yml``) is written in the option files'
vocabulary, so a row reads like the ``train:`` section that trains it with BasicSR::

    output_kd_opt: {type: OutputKDLoss, loss_weight: 1.0}     # output KD
    kd_opt: {type: FitNetLoss, loss_weight: 1.0}              # one feature loss per distillation point
    optim_kd: {lr: 1.0e-2, betas: [0.9, 0.999]}               # the regressors' own Adam group (with kd_opt)
    upcycle_opt: {zoom_in: 1, zoom_out: true, aug_prob: 0.3}  # DUKD's data upcycling
    network_kr: {type: KRNet, num_kernels: 8, ...}            # MetaKD: the KRNets,
    texture_opt: {type: TextureWiseLoss, loss_weight: 1.0, criterion: charbonnier, eps: 0.01}
    optim_kr: {lr: 1.0e-2, betas: [0.9, 0.999]}               #   their optimizer (type Adam, lr 1e-4 unless given)
    meta: {every: 16, objective: horizon, ...}                #   and the meta step

``{}`` is the student alone. :data:`PROTOCOL_KEYS` are the benchmark's own (no option file has them).
Blocks of the benchmark's first vocabulary (``output_kd: w``, ``pair``, ``regressor_optim``,
``upcycle``, ``metakd: {krnet, texture_weight, texture, optim_kr, meta, ...}``) are an error in a
config, naming the replacement; :func:`from_legacy` translates the blocks that finished runs
recorded in their ``result.json``, so those runs are still reused.
"""
from __future__ import annotations

import copy

__all__ = ['PIXEL_OPT', 'OPTION_KEYS', 'PROTOCOL_KEYS', 'LEGACY_KEYS', 'ABLATION_KEYS', 'check_method',
           'method_options', 'is_metakd', 'meta_every', 'canonical', 'from_legacy', 'config_from_legacy',
           'comparable_config', 'ablation_block']

#: the student's reconstruction loss in every method (and MetaKD's meta objective)
PIXEL_OPT = {'type': 'L1Loss', 'loss_weight': 1.0}
#: the option-file blocks a method block may hold (``train.<key>`` of a BasicSR option file)
OPTION_KEYS = ('output_kd_opt', 'kd_opt', 'optim_kd', 'upcycle_opt', 'network_kr', 'texture_opt', 'optim_kr', 'meta')
_METAKD_KEYS = ('network_kr', 'texture_opt', 'optim_kr', 'meta')
#: the protocol's own keys
PROTOCOL_KEYS = {
    'meta_data': 'MetaKD only: quiz (meta batches from the held-out split data.quiz) or null (the previous '
                 'training batch)',
    'start_fraction': "MetaKD only: meta.start as a fraction in [0, 1) of the run's iterations",
    'equal_compute': "hand-crafted rows only: <row>, run the iterations whose teacher + student FLOPs equal "
                     "<row>'s",
}
#: the first vocabulary's keys and what replaced them
LEGACY_KEYS = {
    'output_kd': 'output_kd_opt: {type: OutputKDLoss, loss_weight: <w>}',
    'pair': 'kd_opt: {type: <loss>, ...}',
    'regressor_optim': 'optim_kd: {lr, betas}',
    'upcycle': 'upcycle_opt: {...}',
    'metakd': 'network_kr: {type: KRNet, ...}, texture_opt: {type: TextureWiseLoss, ...}, optim_kr, meta, '
              'meta_data and start_fraction, each at the top of the method block',
}
#: what an ablation variant may update in its method's block (besides ``method``)
ABLATION_KEYS = ('network_kr', 'meta', 'texture_opt', 'optim_kr')
_LEGACY_ABLATION = {'krnet': 'network_kr', 'texture': 'texture_opt', 'texture_weight': 'texture_opt.loss_weight'}
_TYPED = {'output_kd_opt': 'OutputKDLoss', 'kd_opt': 'FitNetLoss, ATLoss or FAKDLoss', 'network_kr': 'KRNet',
          'texture_opt': 'TextureWiseLoss'}


def is_metakd(block: dict) -> bool:
    return 'network_kr' in (block or {})


def meta_every(block: dict) -> int | None:
    """Iterations per meta step of a MetaKD block whose KRNets are meta-learned (else None)."""
    if not is_metakd(block):
        return None
    meta = block.get('meta') or {}
    return meta.get('every', 1) if meta.get('update', 'meta') == 'meta' else None


def check_method(block: dict, key: str = 'methods.<name>') -> None:
    """Raise if ``block`` is not a method block; every error names ``<key>.<option>``."""
    block = block or {}
    for k in block:
        if k in LEGACY_KEYS:
            raise KeyError(f'{key}.{k}: a key of the benchmark\'s old vocabulary; write {LEGACY_KEYS[k]}')
    unknown = sorted(set(block) - set(OPTION_KEYS) - set(PROTOCOL_KEYS))
    if unknown:
        raise KeyError(f'{key}: unknown key(s) {unknown}; allowed: {list(OPTION_KEYS) + list(PROTOCOL_KEYS)}')
    for k, want in _TYPED.items():
        if k in block and not (block[k] or {}).get('type'):
            raise ValueError(f'{key}.{k}.type: missing ({want})')
    meta = is_metakd(block)
    if 'kd_opt' in block and meta:
        raise ValueError(f'{key}: kd_opt (a hand-crafted feature loss) and network_kr (MetaKD) cannot be combined')
    if not meta:
        extra = sorted(k for k in ('texture_opt', 'optim_kr', 'meta', 'meta_data', 'start_fraction') if k in block)
        if extra:
            raise ValueError(f'{key}.{extra[0]}: a MetaKD key; needs {key}.network_kr')
    if 'optim_kd' in block:
        ro = block['optim_kd'] or {}
        if 'kd_opt' not in block or sorted(set(ro) - {'lr', 'betas'}):
            raise ValueError(f'{key}.optim_kd: {{lr, betas}} of the regressors of a kd_opt loss (Adam, its own '
                             f'param group, cosine like the student); needs {key}.kd_opt, got {ro!r}')
    if block.get('meta_data') not in (None, 'quiz'):
        raise ValueError(f'{key}.meta_data: {PROTOCOL_KEYS["meta_data"]}, got {block["meta_data"]!r}')
    sf = block.get('start_fraction')
    if 'start_fraction' in block and not (isinstance(sf, (int, float)) and 0 <= sf < 1):
        raise ValueError(f'{key}.start_fraction: {PROTOCOL_KEYS["start_fraction"]}, got {sf!r}')
    if 'start_fraction' in block and 'start' in (block.get('meta') or {}):
        raise ValueError(f'{key}: give start_fraction or meta.start, not both')
    if meta and block.get('equal_compute'):
        raise ValueError(f'{key}.equal_compute: {PROTOCOL_KEYS["equal_compute"]}')


def method_options(block: dict, key: str = 'methods.<name>') -> dict:
    """The :mod:`krdistill.build` option blocks of a method block (checked; errors name ``key``).

    ``pixel_opt`` (:data:`PIXEL_OPT`) plus the block's option-file blocks; ``optim_kr`` gets its
    defaults (``type: Adam``, ``lr: 1e-4``, ``betas: [0.9, 0.999]``), numbers given as strings
    (YAML's ``1e-2``) become floats. ``optim_kd`` and the protocol keys are not builder blocks.
    """
    block = block or {}
    check_method(block, key)
    out = {'pixel_opt': dict(PIXEL_OPT)}
    for k in ('upcycle_opt', 'output_kd_opt', 'kd_opt', 'network_kr', 'texture_opt', 'meta'):
        if k in block:
            out[k] = copy.deepcopy(dict(block[k] or {}))
    for k in ('output_kd_opt', 'texture_opt'):
        if k in out:
            out[k]['loss_weight'] = float(out[k].get('loss_weight', 1.0))
    if is_metakd(block):
        oc = dict(block.get('optim_kr') or {})
        out['optim_kr'] = dict(oc, type=oc.get('type', 'Adam'), lr=float(oc.get('lr', 1e-4)),
                               betas=list(oc.get('betas', (0.9, 0.999))))
    return out


def canonical(block: dict) -> dict:
    """What a block trains, in one form (old vocabulary translated, defaults filled): two blocks
    with the same canonical form train the same run."""
    block = from_legacy(block or {})
    out = method_options(block)
    out.update({k: block[k] for k in ('optim_kd', *PROTOCOL_KEYS) if k in block})
    return out


def from_legacy(old: dict) -> dict:
    """A method block of the first vocabulary in the option-file vocabulary (a new block unchanged).

    ``output_kd: w`` -> ``output_kd_opt`` (``OutputKDLoss``, weight ``w``; ``0`` -> none), ``pair`` ->
    ``kd_opt``, ``regressor_optim`` -> ``optim_kd``, ``upcycle`` -> ``upcycle_opt``, ``metakd: {krnet,
    texture_weight, texture, optim_kr, meta, meta_data, start_fraction}`` -> ``network_kr`` (``KRNet``),
    ``texture_opt`` (``TextureWiseLoss``, weight ``texture_weight``), ``optim_kr`` (Adam), ``meta``,
    ``meta_data``, ``start_fraction``: what the first vocabulary's translation built, value for value.
    """
    old = copy.deepcopy(old or {})
    if not set(old) & set(LEGACY_KEYS):
        return old
    new = {}
    if old.get('output_kd'):
        new['output_kd_opt'] = {'type': 'OutputKDLoss', 'loss_weight': float(old['output_kd'])}
    if 'pair' in old:
        new['kd_opt'] = dict(old['pair'] or {})
    if 'regressor_optim' in old:
        new['optim_kd'] = dict(old['regressor_optim'] or {})
    if 'upcycle' in old:
        new['upcycle_opt'] = dict(old['upcycle'] or {})
    if 'metakd' in old:
        mk = old['metakd'] or {}
        oc = mk.get('optim_kr') or {}
        new.update(network_kr={'type': 'KRNet', **(mk.get('krnet') or {})},
                   texture_opt={'type': 'TextureWiseLoss', 'loss_weight': float(mk.get('texture_weight', 1.0)),
                                **(mk.get('texture') or {})},
                   optim_kr={'type': 'Adam', 'lr': float(oc.get('lr', 1e-4)),
                             'betas': list(oc.get('betas', (0.9, 0.999)))},
                   meta=dict(mk.get('meta') or {}))
        new.update({k: mk[k] for k in ('meta_data', 'start_fraction') if k in mk})
    new.update({k: v for k, v in old.items() if k not in LEGACY_KEYS})  # equal_compute
    return new


def _legacy_variant(vc: dict) -> dict:
    """An ablation variant of the first vocabulary (``krnet``, ``texture``, ``texture_weight``) in the new one."""
    vc = copy.deepcopy(vc or {})
    new = {k: v for k, v in vc.items() if k not in _LEGACY_ABLATION}
    if 'krnet' in vc:
        new['network_kr'] = vc['krnet']
    if 'texture' in vc or 'texture_weight' in vc:
        new['texture_opt'] = dict(vc.get('texture') or {})
        if 'texture_weight' in vc:
            new['texture_opt']['loss_weight'] = vc['texture_weight']
    return new


def config_from_legacy(cfg: dict) -> dict:
    """A benchmark config (as a run folder's ``config.json`` recorded it) with every method block
    and ablation variant in the option-file vocabulary."""
    cfg = copy.deepcopy(cfg)
    cfg['methods'] = {m: from_legacy(b) for m, b in (cfg.get('methods') or {}).items()}
    abl = cfg.get('ablations') or {}
    if abl.get('variants'):
        abl['variants'] = {v: _legacy_variant(vc) for v, vc in abl['variants'].items()}
    return cfg


def comparable_config(cfg: dict) -> dict:
    """``cfg`` with every method block in :func:`canonical` form (and the ablation variants in the
    option-file vocabulary): two configs that compare equal run the same jobs."""
    cfg = config_from_legacy(cfg)
    cfg['methods'] = {m: canonical(b) for m, b in cfg['methods'].items()}
    return cfg


def ablation_block(methods: dict, vc: dict, key: str = 'ablations.variants.<name>') -> dict:
    """The method block of an ablation variant: ``methods[vc['method']]`` (default ``metakd_exact``)
    with the variant's ``network_kr``, ``meta``, ``texture_opt`` and ``optim_kr`` entries updated."""
    for k in vc:
        if k in _LEGACY_ABLATION:
            raise KeyError(f'{key}.{k}: a key of the benchmark\'s old vocabulary; write {_LEGACY_ABLATION[k]}')
    unknown = sorted(set(vc) - {'method', *ABLATION_KEYS})
    if unknown:
        raise KeyError(f'{key}: unknown key(s) {unknown}; allowed: method, {", ".join(ABLATION_KEYS)}')
    base = copy.deepcopy(methods[vc.get('method', 'metakd_exact')])
    for sect in ABLATION_KEYS:
        if sect in vc:
            if not is_metakd(base):
                raise ValueError(f'{key}.{sect}: method {vc.get("method", "metakd_exact")!r} is not a MetaKD row')
            base.setdefault(sect, {}).update(vc[sect])
    return base
