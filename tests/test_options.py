"""Options sweep: every ``options/**/*.yml`` loads and resolves before anyone spends a GPU day on it.

Each file is loaded with BasicSR's own YAML loader (``ordered_yaml``) and checked against the
registries and the classes it names: the model, every ``network_*`` (built with its kwargs; a
KRNet gets the channels of its distillation point), every ``train.*_opt`` loss (built), the
optimisers and the scheduler (built on a dummy parameter), datasets, metrics, the ``kd`` layer
lists (the names exist in ``named_modules()`` of the built networks and a 1-image forward
records them), the teacher checkpoint keys and the MetaKD ``meta`` block. Tests are
parametrised per file, so a failure names the file. Nothing is downloaded or written; networks
are built once per distinct block (CPU, seconds).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

import krdistill  # noqa: F401  (shims + registration before basicsr)
from basicsr.archs import build_network
from basicsr.models import lr_scheduler
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

from krdistill.distiller import probe
from krdistill.meta_options import check_meta_options
from krdistill.build import build_module
from krdistill.models.kd_model import KD_KEYS, KDSRModel

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / 'options'
# options/bench/ holds the benchmark tool's own protocol files (checked in tests/test_benchmark.py)
OPTION_FILES = sorted(p for p in OPTIONS.rglob('*.yml') if 'bench' not in p.relative_to(OPTIONS).parts)
IDS = [p.relative_to(REPO).as_posix() for p in OPTION_FILES]

#: model types that distil from a teacher even before their class is importable here
TEACHER_MODELS = ('KDSRModel', 'MetaKDModel')
OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD}
#: BasicSR 1.4.2 BaseModel.setup_schedulers: MultiStepLR is an alias of MultiStepRestartLR
SCHEDULERS = {
    'MultiStepLR': lr_scheduler.MultiStepRestartLR,
    'MultiStepRestartLR': lr_scheduler.MultiStepRestartLR,
    'CosineAnnealingRestartLR': lr_scheduler.CosineAnnealingRestartLR,
}
#: losses that would download weights when built (VGG); only their type is checked
NO_BUILD_LOSSES = ('PerceptualLoss', )
META_KEYS = {'every', 'mode', 'update', 'fd_eps', 'virtual_step', 'objective', 'horizon_decay', 'horizon_stride',
             'horizon_terms', 'start', 'dataset'}
META_CHOICES = {'mode': ('exact', 'finite_difference'), 'update': ('meta', 'joint', 'frozen'),
                'virtual_step': ('optimizer', ), 'objective': ('one_step', 'horizon'), 'horizon_terms': ('all', 'one')}
#: KRNet channels used when a file has no distillation points to read them from
DUMMY_CHANNELS = 64

_LOADED: dict[Path, dict] = {}
_NETS: dict[str, torch.nn.Module] = {}
_PROBES: dict[tuple, tuple] = {}


def load(path: Path) -> dict:
    """The option dict of ``path`` as BasicSR's ``parse_options`` reads it (a private copy)."""
    if path not in _LOADED:
        with open(path, encoding='utf-8') as f:
            _LOADED[path] = yaml.load(f, Loader=ordered_yaml()[0])
    return copy.deepcopy(_LOADED[path])


def _key(net_opt: dict) -> str:
    return json.dumps(net_opt, sort_keys=True, default=str)


def build(net_opt: dict, where: str) -> torch.nn.Module:
    """``build_network`` once per distinct block; errors name the YAML key."""
    key = _key(net_opt)
    if key not in _NETS:
        net_type = net_opt.get('type')
        assert net_type in ARCH_REGISTRY, (f'{where}.type: {net_type!r} is not in ARCH_REGISTRY '
                                           f'(e.g. {sorted(ARCH_REGISTRY._obj_map)[:15]})')
        try:
            _NETS[key] = build_network(copy.deepcopy(net_opt)).eval()
        except Exception as e:  # noqa: BLE001  (report which block and why)
            pytest.fail(f'{where}: build_network({dict(net_opt)}) failed: {type(e).__name__}: {e}')
    return _NETS[key]


def probe_size(net_opt: dict) -> int:
    """A small LR size every arch accepts (window-based archs need a multiple of the window)."""
    return max(8, int(net_opt.get('window_size', 1)))


def run_probe(net_opt: dict, layers: list[str], where: str) -> tuple:
    """One forward of a 1-image batch: (output shape, [feature shapes]) recorded by the hooks."""
    key = (_key(net_opt), tuple(layers))
    if key not in _PROBES:
        net = build(net_opt, where)
        size = probe_size(net_opt)
        in_ch = net_opt.get('num_in_ch', net_opt.get('in_chans', 3))
        with torch.no_grad():
            _PROBES[key] = probe(net, layers, torch.rand(1, in_ch, size, size), key=f'kd.{where}_layers')
    return _PROBES[key]


def model_class(opt: dict):
    return MODEL_REGISTRY.get(opt['model_type']) if opt.get('model_type') in MODEL_REGISTRY else None


def uses_teacher(opt: dict) -> bool:
    cls = model_class(opt)
    return ('network_t' in opt or opt.get('model_type') in TEACHER_MODELS
            or (cls is not None and issubclass(cls, KDSRModel)))


def is_train(opt: dict) -> bool:
    return 'train' in opt


def kd_block(opt: dict) -> dict:
    """The ``kd`` block as a mapping (``kd: auto`` is ``{auto: true}``)."""
    kd = opt.get('kd') or {}
    return {'auto': True} if kd == 'auto' else kd


def kd_lists(opt: dict) -> tuple[list[str], list[str]]:
    """Teacher and student point names; for ``kd: auto`` those :func:`krdistill.pairing.auto_pairs` chooses."""
    kd = kd_block(opt)
    if isinstance(kd, dict) and kd.get('auto'):
        from krdistill.pairing import auto_pairs
        pairs = auto_pairs(build(opt['network_t'], 'network_t'), build(opt['network_g'], 'network_g'),
                           kd.get('points', 1))
        return [p[0] for p in pairs], [p[1] for p in pairs]
    t, s = kd.get('teacher_layers') or [], kd.get('student_layers') or []
    return ([t] if isinstance(t, str) else list(t)), ([s] if isinstance(s, str) else list(s))


def point_channels(opt: dict) -> list[tuple[int, int]]:
    """(s_channels, t_channels) per distillation point, from one forward of each network."""
    t_layers, s_layers = kd_lists(opt)
    if not t_layers or 'network_t' not in opt or len(t_layers) != len(s_layers):
        return [(DUMMY_CHANNELS, DUMMY_CHANNELS)]
    _, t_shapes = run_probe(opt['network_t'], t_layers, 'teacher')
    _, s_shapes = run_probe(opt['network_g'], s_layers, 'student')
    return [(s[1], t[1]) for s, t in zip(s_shapes, t_shapes)]


#: ``train`` blocks named ``*_opt`` that are not losses (checked by their own test)
NOT_LOSSES = ('upcycle_opt', )


def loss_blocks(opt: dict) -> dict:
    return {k: v for k, v in (opt.get('train') or {}).items()
            if k.endswith('_opt') and isinstance(v, dict) and k not in NOT_LOSSES}


@pytest.mark.parametrize('path', [p for p in OPTION_FILES if 'DUKD' in p.name], ids=lambda p: p.name)
def test_upcycle_blocks_are_valid(path):
    from krdistill.upcycle import check_upcycle_options
    opt = load(path)
    up = check_upcycle_options(opt['train']['upcycle_opt'], 'train.upcycle_opt', opt['scale'])
    assert up.zoom_in >= 1 and up.zoom_out and 0 < up.aug_prob < 1


def loss_forward(opt: dict, key: str, loss: torch.nn.Module) -> torch.Tensor | None:
    """One forward of a built loss on random inputs of the right kind (options such as ``criterion``
    are only checked there); None for loss blocks whose inputs this sweep does not know."""
    torch.manual_seed(0)
    if key in ('pixel_opt', 'output_kd_opt'):  # SR output vs GT / teacher output
        return loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    if key not in ('kd_opt', 'texture_opt'):
        return None
    t_layers, s_layers = kd_lists(opt)
    if not t_layers:
        return None
    _, t_shapes = run_probe(opt['network_t'], t_layers, 'teacher')
    _, s_shapes = run_probe(opt['network_g'], s_layers, 'student')
    values = []
    for s_shape, t_shape in zip(s_shapes, t_shapes):
        feat_s, feat_t = torch.randn(s_shape), torch.randn(t_shape)
        if key == 'kd_opt':
            values.append(loss(feat_s, feat_t))
        else:  # texture_opt: on the output of this point's KRNet
            kr_opt = dict(opt.get('network_kr') or {'type': 'KRNet'}, s_channels=s_shape[1], t_channels=t_shape[1])
            with torch.no_grad():
                values.append(loss(build(kr_opt, 'network_kr')(feat_s, feat_t)))
    return torch.stack(values).sum()


def string_values(node, where=''):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from string_values(v, f'{where}.{k}' if where else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from string_values(v, f'{where}[{i}]')
    elif isinstance(node, str):
        yield where, node


per_file = pytest.mark.parametrize('path', OPTION_FILES, ids=IDS)


# ------------------------------------------------------------------------------------ layout
def test_layout_has_the_headline_and_baseline_files():
    names = set(IDS)
    for rel in ('options/metakd_edsr_x4.yml', 'options/metakd_rcan_x4.yml', 'options/metakd_swinir_x4.yml',
                'options/test/test_student_edsr_x4.yml'):
        assert rel in names, f'{rel} is missing (README and docs point to it)'
    for teacher, student in (('EDSRLx4', 'EDSRx4'), ('RCANx4', 'RCANG10B6x4')):
        expected = [f'options/train/kd/train_Baseline_{student}.yml'] + [
            f'options/train/kd/train_KD_{method}_{teacher}_to_{student}.yml'
            for method in ('Output', 'FitNet', 'AT', 'FAKD', 'DUKD')]
        for rel in expected:
            assert rel in names, f'{rel} is missing'


@per_file
def test_loads_with_basicsr_loader(path):
    opt = load(path)
    assert isinstance(opt, dict), f'{path.name}: top level must be a mapping'
    for key in ('name', 'model_type', 'scale', 'datasets', 'network_g'):
        assert key in opt, f'{path.name}: missing top-level key {key!r}'
    assert isinstance(opt['scale'], int) and opt['scale'] >= 1, f'scale: must be a positive int, got {opt["scale"]!r}'


@per_file
def test_paths_are_portable(path):
    """No machine paths: data and checkpoints are relative to the run folder (root_path)."""
    for where, value in string_values(load(path)):
        assert not value.startswith(('/', '~')) and ':\\' not in value, \
            f'{where}: {value!r} is an absolute / machine path; use a path relative to the repo root'


# ------------------------------------------------------------------------------------ registries
@per_file
def test_model_type_registered(path):
    model_type = load(path)['model_type']
    assert model_type in MODEL_REGISTRY, (f'model_type: {model_type!r} is not in MODEL_REGISTRY '
                                          f'(registered: {sorted(MODEL_REGISTRY._obj_map)})')


@per_file
def test_networks_build(path):
    opt = load(path)
    nets = {k: v for k, v in opt.items() if k.startswith('network_')}
    assert 'network_g' in nets
    for key, net_opt in nets.items():
        assert isinstance(net_opt, dict) and 'type' in net_opt, f'{key}: needs a type'
        if net_opt['type'] == 'KRNet':
            for filled in ('s_channels', 't_channels'):
                assert filled not in net_opt, f'{key}.{filled}: filled in by the model from a dummy forward; remove it'
            for i, (s_ch, t_ch) in enumerate(point_channels(opt)):
                net = build(dict(net_opt, s_channels=s_ch, t_channels=t_ch), f'{key} (point {i})')
                assert sum(p.numel() for p in net.parameters()) > 0
        else:
            net = build(net_opt, key)
            if key in ('network_g', 'network_t'):
                size = probe_size(net_opt)
                out_shape, _ = run_probe(net_opt, [], key)
                assert out_shape[-1] == size * opt['scale'], (
                    f'{key}: upscales x{out_shape[-1] // size}, but scale is {opt["scale"]}')


@per_file
def test_losses_resolve_and_build(path):
    opt = load(path)
    blocks = loss_blocks(opt)
    if not is_train(opt):
        return
    assert blocks, 'train: no *_opt loss block'
    channels = point_channels(opt)[0]
    for key, loss_opt in blocks.items():
        loss_type = loss_opt.get('type')
        assert loss_type in LOSS_REGISTRY, (f'train.{key}.type: {loss_type!r} is not in LOSS_REGISTRY '
                                            f'(e.g. {sorted(LOSS_REGISTRY._obj_map)})')
        if loss_type in NO_BUILD_LOSSES:
            continue
        loss = build_module(loss_opt, 'loss', f'train.{key}', s_channels=channels[0], t_channels=channels[1])
        value = loss_forward(opt, key, loss)
        if value is not None:
            assert value.dim() == 0 and torch.isfinite(value), f'train.{key}: forward gave {value}'


@per_file
def test_optimizers_and_scheduler(path):
    opt = load(path)
    if not is_train(opt):
        return
    train = opt['train']
    assert 'optim_g' in train, 'train.optim_g: missing'
    for key, optim_opt in train.items():
        if not key.startswith('optim_'):
            continue
        assert isinstance(optim_opt, dict), f'train.{key}: must be a mapping'
        if key == 'optim_kd':  # overrides of the KD param group of optim_g, no type of its own
            assert not {'type', 'params'} & set(optim_opt), f'train.{key}: param-group overrides only (e.g. lr)'
            continue
        optim_opt = dict(optim_opt)
        optim_type = optim_opt.pop('type', None)
        assert optim_type in OPTIMIZERS, f'train.{key}.type: {optim_type!r} is not one of {sorted(OPTIMIZERS)}'
        OPTIMIZERS[optim_type]([torch.nn.Parameter(torch.zeros(1))], **optim_opt)

    sched = dict(train['scheduler'])
    sched_type = sched.pop('type', None)
    assert sched_type in SCHEDULERS, f'train.scheduler.type: {sched_type!r} is not one of {sorted(SCHEDULERS)}'
    SCHEDULERS[sched_type](torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4), **sched)
    total = int(train['total_iter'])
    assert total > 0, 'train.total_iter: must be > 0'
    for m in sched.get('milestones', []):
        assert 0 < m < total, f'train.scheduler.milestones: {m} is outside (0, total_iter={total})'


@per_file
def test_datasets(path):
    opt = load(path)
    datasets = opt['datasets']
    assert datasets, 'datasets: empty'
    for phase, d in datasets.items():
        assert d.get('type') in DATASET_REGISTRY, f'datasets.{phase}.type: {d.get("type")!r} is not in DATASET_REGISTRY'
        assert 'io_backend' in d and 'type' in d['io_backend'], f'datasets.{phase}.io_backend.type: missing'
        if is_train(opt):
            assert phase == 'train' or phase.split('_')[0] in ('val', 'meta'), \
                f'datasets.{phase}: a training file has train, val* (and MetaKD meta) datasets only'
    if not is_train(opt):
        return
    train = datasets.get('train')
    assert train is not None, 'datasets.train: missing'
    for key in ('gt_size', 'batch_size_per_gpu', 'num_worker_per_gpu'):
        assert key in train, f'datasets.train.{key}: missing'
    assert train['gt_size'] % opt['scale'] == 0, 'datasets.train.gt_size: must be a multiple of scale'
    lq_size = train['gt_size'] // opt['scale']
    for key in ('network_g', 'network_t'):
        window = (opt.get(key) or {}).get('window_size')
        if window:
            assert lq_size % window == 0, (f'datasets.train.gt_size / scale = {lq_size} must be a multiple of '
                                           f'{key}.window_size = {window}')


@per_file
def test_validation_metrics(path):
    opt = load(path)
    metrics = (opt.get('val') or {}).get('metrics') or {}
    for name, m in metrics.items():
        assert m.get('type') in METRIC_REGISTRY, f'val.metrics.{name}.type: {m.get("type")!r} is not in METRIC_REGISTRY'
        if m['type'] in ('calculate_psnr', 'calculate_ssim'):
            # protocol (METAKD.md): Y channel, border = scale
            assert m.get('crop_border') == opt['scale'], f'val.metrics.{name}.crop_border: must equal scale'
            assert m.get('test_y_channel') is True, f'val.metrics.{name}.test_y_channel: must be true (Y channel)'


# ------------------------------------------------------------------------------------ distillation
@per_file
def test_teacher_and_resume_settings(path):
    opt = load(path)
    if not uses_teacher(opt):
        assert 'network_t' not in opt and 'kd' not in opt, 'a model without a teacher has no network_t / kd'
        return
    assert 'network_t' in opt, f'network_t: {opt["model_type"]} needs a teacher network block'
    p = opt.get('path') or {}
    ckpt = p.get('pretrain_network_t')
    assert isinstance(ckpt, str) and ckpt.endswith(('.pth', '.pt')), \
        f'path.pretrain_network_t: a teacher checkpoint path is required, got {ckpt!r}'
    assert p.get('param_key_t', 'params') in ('params', 'params_ema', None), \
        f'path.param_key_t: {p.get("param_key_t")!r} (params, params_ema or null for a bare state_dict)'
    assert isinstance(p.get('strict_load_t', True), bool), 'path.strict_load_t: must be true / false'
    assert 'network_t' in (p.get('ignore_resume_networks') or []), \
        'path.ignore_resume_networks: list network_t (the teacher is never saved; resume must not look for it)'


@per_file
def test_distillation_points_exist(path):
    opt = load(path)
    if not uses_teacher(opt):
        return
    kd = kd_block(opt)
    assert isinstance(kd, dict), 'kd: must be "auto" or a mapping'
    allowed = {'auto', 'points'} if kd.get('auto') else set(getattr(model_class(opt), 'kd_keys', KD_KEYS))
    assert set(kd) <= allowed, f'kd: unknown key(s) {sorted(set(kd) - allowed)}; allowed: {sorted(allowed)}'
    t_layers, s_layers = kd_lists(opt)
    assert len(t_layers) == len(s_layers), (f'kd.teacher_layers ({len(t_layers)}) and kd.student_layers '
                                            f'({len(s_layers)}) must pair up one to one')
    train = opt.get('train') or {}
    if train.get('kd_opt') or train.get('texture_opt') or 'network_kr' in opt:
        assert t_layers, 'kd.teacher_layers / kd.student_layers: feature distillation needs distillation points'
    for net_key, layers, side in (('network_t', t_layers, 'teacher'), ('network_g', s_layers, 'student')):
        names = dict(build(opt[net_key], net_key).named_modules())
        missing = [n for n in layers if n not in names or n == '']
        assert not missing, f'kd.{side}_layers: {missing} not in named_modules() of {opt[net_key]["type"]}'
        assert len(set(layers)) == len(layers), f'kd.{side}_layers: duplicate names'
        _, shapes = run_probe(opt[net_key], layers, side)
        for name, shape in zip(layers, shapes):
            assert len(shape) == 4, f'kd.{side}_layers: {name} records {shape}, not a B x C x H x W map'
    if t_layers:  # same LR input: teacher and student maps have the same spatial size
        (_, t_shapes), (_, s_shapes) = run_probe(opt['network_t'], t_layers, 'teacher'), \
            run_probe(opt['network_g'], s_layers, 'student')
        size_t, size_s = probe_size(opt['network_t']), probe_size(opt['network_g'])
        if size_t == size_s:
            for tn, sn, ts, ss in zip(t_layers, s_layers, t_shapes, s_shapes):
                assert ts[-2:] == ss[-2:], f'kd: {tn} {ts} and {sn} {ss} differ in spatial size'


@per_file
def test_metakd_block(path):
    opt = load(path)
    if opt['model_type'] == 'MetaKDModel':
        train = opt.get('train', {})
        assert 'network_kr' in opt, 'network_kr: MetaKDModel needs a KRNet block'
        assert 'texture_opt' in train, 'train.texture_opt: MetaKDModel needs the texture-wise loss'
        assert 'kd_opt' not in train, 'train.kd_opt: hand-crafted feature losses belong to KDSRModel files'
    if 'meta' not in opt:
        return
    check_meta_options(opt['meta'], extra_keys=('dataset', ))  # the model's own validator accepts the block
    meta = opt['meta']
    assert isinstance(meta, dict), 'meta: must be a mapping'
    assert set(meta) <= META_KEYS, f'meta: unknown key(s) {sorted(set(meta) - META_KEYS)}; allowed: {sorted(META_KEYS)}'
    if 'every' in meta:
        every = meta['every']
        assert isinstance(every, int) and not isinstance(every, bool) and every >= 1, \
            f'meta.every: a positive int, got {every!r}'
    for key, choices in META_CHOICES.items():
        if key in meta:
            assert meta[key] in choices, f'meta.{key}: {meta[key]!r} is not one of {choices}'
    if 'fd_eps' in meta:
        eps = meta['fd_eps']
        assert isinstance(eps, (int, float)) and eps > 0, f'meta.fd_eps: > 0, got {eps!r}'


BENCH_FILES = sorted((OPTIONS / 'bench').rglob('*.yml'))


@pytest.mark.parametrize('path', BENCH_FILES, ids=[p.name for p in BENCH_FILES])
def test_bench_protocol_files(path):
    """The benchmark's own protocol files load and every method names real losses and KRNet options."""
    from krdistill.archs.krnet_arch import KRNet
    from krbench.benchmark import build_net, load_config  # tools/ (tests/conftest.py)
    from krdistill.losses import kd_loss
    from krdistill.meta_options import REMOVED_KRNET_KEYS, check_meta_options, check_removed
    if 'base' in (yaml.safe_load(path.read_text()) or {}):  # a derived config: the base updated by the rest
        import gpu_protocol  # tools/ (tests/conftest.py)
        cfg = gpu_protocol.load_protocol(path)
    else:
        cfg = load_config(path)
    build_net(copy.deepcopy(cfg['student']['network']))
    assert len(cfg['kd']['teacher_layers']) == len(cfg['kd']['student_layers'])
    for name, m in cfg['methods'].items():
        if 'kd_opt' in m:
            pc = dict(m['kd_opt'])
            cls = getattr(kd_loss, pc.pop('type'))
            (cls(8, 8, **pc) if cls is kd_loss.FitNetLoss else cls(**pc))
        if 'network_kr' in m:
            kr = {k: v for k, v in m['network_kr'].items() if k != 'type'}
            check_removed(kr, f'{path.name}: methods.{name}.network_kr', REMOVED_KRNET_KEYS)
            KRNet(8, 8, **kr)
            check_meta_options(m.get('meta', {}), key=f'{path.name}: methods.{name}.meta')


# ------------------------------------------------------------------------------------ known keys
@per_file
def test_every_key_is_known(path):
    """The model's known-key check (krdistill/option_checks.py) passes on the file: the top level,
    train, path, the network blocks, kd, meta, every KD term and optimizer block."""
    from krdistill.build import OPTIMIZERS as KNOWN_OPTIMIZERS
    from krdistill.meta_options import META_DEFAULTS
    from krdistill.models.teacher_model import check_arch_keys
    from krdistill.option_checks import check_keys, check_option_keys, signature_keys
    from krdistill.upcycle import check_upcycle_options
    opt = load(path)
    model = MODEL_REGISTRY.get(opt['model_type'])
    if not hasattr(model, 'option_keys'):
        pytest.skip(f'{opt["model_type"]} is BasicSR\'s own model')
    check_option_keys(opt, model.option_keys)
    for key in ('network_g', 'network_t'):
        check_arch_keys(opt.get(key), key)
    kd = opt.get('kd')
    if isinstance(kd, dict):
        check_keys(kd, (*model.kd_keys, 'auto', 'points'), 'kd')
    if opt.get('meta') is not None:
        check_keys(opt['meta'], (*META_DEFAULTS, 'dataset'), 'meta')
    train = opt['train']
    if train.get('upcycle_opt') is not None:
        check_upcycle_options(train['upcycle_opt'], 'train.upcycle_opt', opt['scale'])
    for name, block in train.items():
        if name.startswith('optim_') and isinstance(block, dict) and block.get('type') in KNOWN_OPTIMIZERS:
            check_keys(block, ('type', *signature_keys(KNOWN_OPTIMIZERS[block['type']], skip=('self', 'params'))),
                       f'train.{name}')
        elif name.endswith('_opt') and name != 'upcycle_opt' and isinstance(block, dict) \
                and block.get('type') in LOSS_REGISTRY:
            known = signature_keys(LOSS_REGISTRY.get(block['type']))
            if known is not None:
                check_keys(block, ('type', *known), f'train.{name}')
    if opt['model_type'] == 'KDSRModel':
        assert any(train.get(k) for k in ('output_kd_opt', 'kd_opt', 'upcycle_opt')), 'train: KDSRModel without a KD term'
