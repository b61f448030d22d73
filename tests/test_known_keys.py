"""Every key is known (issue 28, principle 2): a misspelled key, at the top level or in any of
krdistill's blocks, is refused before iteration 1 naming its full YAML path and the nearest known
key, under ``krdistill-train`` and BasicSR's own ``basicsr/train.py``; BasicSR's own keys pass; a
KD model with no KD term is refused."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from helpers import tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.option_checks import UnknownKeyError, check_keys, check_option_keys, nearest_key
from krdistill.train import main as train_main

_AUTOLOAD_TESTS = Path(__file__).with_name('test_autoload.py')


def _rename(block: str | None, old: str, new: str):
    def edit(opt):
        node = opt if block is None else _node(opt, block)
        node[new] = node.pop(old)
    return edit


def _add(block: str | None, key: str, value):
    def edit(opt):
        node = opt if block is None else _node(opt, block)
        node[key] = value
    return edit


def _node(opt: dict, dotted: str) -> dict:
    for k in dotted.split('.'):
        opt = opt.setdefault(k, {})
    return opt


#: (model, edit, the misspelled key's full path, the nearest known key's full path)
CASES = {
    'Network_t': ('kd', _rename(None, 'network_t', 'Network_t'), 'Network_t', 'network_t'),
    'network_teacher': ('kd', _rename(None, 'network_t', 'network_teacher'), 'network_teacher', 'network_t'),
    'manual_sed': ('kd', _rename(None, 'manual_seed', 'manual_sed'), 'manual_sed', 'manual_seed'),
    'sacle': ('kd', _add(None, 'sacle', 2), 'sacle', 'scale'),
    'train.total_iters': ('kd', _add('train', 'total_iters', 8), 'train.total_iters', 'train.total_iter'),
    'train.output_kd_op': ('kd', _rename('train', 'output_kd_opt', 'output_kd_op'), 'train.output_kd_op',
                           'train.output_kd_opt'),
    'train.optim_kd.lrr': ('kd', _add('train', 'optim_kd', {'lrr': 1e-3}), 'train.optim_kd.lrr',
                           'train.optim_kd.lr'),
    'train.output_kd_opt.lossweight': ('kd', _add('train.output_kd_opt', 'lossweight', 1.0),
                                       'train.output_kd_opt.lossweight', 'train.output_kd_opt.loss_weight'),
    'kd.teacher_layer': ('kd', _add('kd', 'teacher_layer', ['body.1']), 'kd.teacher_layer', 'kd.teacher_layers'),
    'path.strict_laod_t': ('kd', _add('path', 'strict_laod_t', True), 'path.strict_laod_t', 'path.strict_load_t'),
    'path.pretrain_network_tt': ('kd', _add('path', 'pretrain_network_tt', 'x.pth'), 'path.pretrain_network_tt',
                                 'path.pretrain_network_t'),
    'network_t.num_fet': ('kd', _add('network_t', 'num_fet', 8), 'network_t.num_fet', 'network_t.num_feat'),
    'network_g.upscal': ('kd', _add('network_g', 'upscal', 2), 'network_g.upscal', 'network_g.upscale'),
    'train.upcycle_opt.zoom_inn': ('kd', _add('train', 'upcycle_opt', {'zoom_inn': 1}), 'train.upcycle_opt.zoom_inn',
                                   'train.upcycle_opt.zoom_in'),
    'meat': ('metakd', _rename(None, 'meta', 'meat'), 'meat', 'meta'),
    'meta.evry': ('metakd', _add('meta', 'evry', 4), 'meta.evry', 'meta.every'),
    'meta.datset': ('metakd', _add('meta', 'datset', {}), 'meta.datset', 'meta.dataset'),
    'network_kr.widht': ('metakd', _add('network_kr', 'widht', 8), 'network_kr.widht', 'network_kr.width'),
    'train.texture_op': ('metakd', _rename('train', 'texture_opt', 'texture_op'), 'train.texture_op',
                         'train.texture_opt'),
    'train.optim_kr.lrr': ('metakd', _add('train.optim_kr', 'lrr', 1e-3), 'train.optim_kr.lrr', 'train.optim_kr.lr'),
    'path.strict_load_kk': ('metakd', _add('path', 'strict_load_kk', True), 'path.strict_load_kk',
                            'path.strict_load_kr'),
}


def _opt(tmp_path: Path, model: str) -> dict:
    return tiny_metakd_opt(tmp_path, total_iter=2) if model == 'metakd' else tiny_opt(tmp_path, total_iter=2)


def _not_started(tmp_path: Path, opt: dict) -> None:
    exp = tmp_path / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth')), 'refused only after training started'


@pytest.mark.parametrize('case', CASES)
def test_unknown_key_is_refused_by_krdistill_train_naming_the_nearest_key(tmp_path, case):
    model, edit, bad, near = CASES[case]
    opt = _opt(tmp_path, model)
    edit(opt)
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'bad.yml')
    with pytest.raises(KeyError) as e:
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f'{bad}: unknown key; did you mean {near}?'), msg
    _not_started(tmp_path, opt)


@pytest.mark.parametrize('case', CASES)
def test_unknown_key_is_refused_when_the_model_is_built(tmp_path, case):
    """The same check in the models themselves (any entry point: BasicSR's build_model here)."""
    from basicsr.models import build_model
    model, edit, bad, near = CASES[case]
    opt = _opt(tmp_path, model)
    edit(opt)
    with pytest.raises(KeyError) as e:
        build_model(opt)
    assert str(e.value).startswith(f'{bad}: unknown key; did you mean {near}?'), str(e.value)


def test_an_unknown_path_key_makes_no_folder_under_krdistill_train(tmp_path):
    """BasicSR makes a folder for every path key it does not know; krdistill-train refuses first."""
    opt = tiny_opt(tmp_path, total_iter=2)
    opt['path']['modles'] = str(tmp_path / 'made_by_basicsr')
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'bad.yml')
    with pytest.raises(KeyError, match=r'^path\.modles: unknown key; did you mean path\.models\?'):
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    assert not (tmp_path / 'made_by_basicsr').exists()
    assert not (tmp_path / 'experiments' / opt['name']).exists()


def test_basicsr_keys_pass(tmp_path):
    """BasicSR's own keys (top level, train, path) are known to krdistill's models."""
    from krdistill.models.kd_model import KDSRModel
    from krdistill.models.metakd_model import MetaKDModel
    opt = tiny_metakd_opt(tmp_path)
    opt.update(network_d={'type': 'VGGStyleDiscriminator'}, dist_params={'backend': 'nccl', 'port': 29500},
               find_unused_parameters=False)
    opt['train'].update(optim_d={'type': 'Adam', 'lr': 1e-4}, perceptual_opt=None, gan_opt=None, net_d_iters=1,
                        net_d_init_iters=0, max_nonfinite=3)
    opt['path'].update(pretrain_network_d=None, param_key_d='params', strict_load_d=True, param_key_g='params_ema',
                       pretrain_network_kr=None, param_key_kr='params', strict_load_kr=True, results_root='r')
    check_option_keys(opt, MetaKDModel.option_keys)
    for key in ('meta', 'network_kr'):
        opt.pop(key)
    opt['train'].pop('texture_opt')
    opt['train'].pop('optim_kr')
    opt['path'] = {k: v for k, v in opt['path'].items() if not k.endswith('_kr')}
    check_option_keys(opt, KDSRModel.option_keys)
    with pytest.raises(UnknownKeyError, match=r'^meta: unknown key'):  # MetaKD's keys are MetaKD's
        check_option_keys(dict(opt, meta={}), KDSRModel.option_keys)


def test_a_subclass_extends_the_known_keys_without_copying():
    from krdistill.models.kd_model import KDSRModel
    from krdistill.models.metakd_model import MetaKDModel
    from krdistill.models.teacher_model import TeacherStudentModel
    base = TeacherStudentModel.option_keys
    assert KDSRModel.option_keys is base
    assert set(MetaKDModel.option_keys['']) == set(base['']) | {'network_kr', 'meta'}
    assert set(MetaKDModel.option_keys['train']) == set(base['train']) | {'texture_opt', 'optim_kr'}


def test_check_keys_names_the_full_path_and_nearest_key():
    check_keys({'a': 1}, ['a', 'b'], 'x.y')
    with pytest.raises(UnknownKeyError) as e:
        check_keys({'lr': 1, 'Betas': 2}, ['lr', 'betas'], 'train.optim_g')
    assert str(e.value).startswith('train.optim_g.Betas: unknown key; did you mean train.optim_g.betas?')
    with pytest.raises(UnknownKeyError) as e:
        check_keys({'zzz': 1}, ['lr', 'betas'], '')
    assert str(e.value).startswith('zzz: unknown key (known here: betas, lr)')
    assert nearest_key('network-T', ['network_t', 'network_g']) == 'network_t'
    with pytest.raises(TypeError, match=r'^train\.pixel_opt: must be a mapping, got list'):
        check_keys([1], ['a'], 'train.pixel_opt')


# ------------------------------------------------------------------ a KD model needs a KD term
def test_kd_model_without_a_kd_term_is_refused(tmp_path):
    opt = tiny_opt(tmp_path, total_iter=2)
    opt['train'].pop('output_kd_opt')
    yml = write_yaml(copy.deepcopy(opt), tmp_path / 'no_kd.yml')
    with pytest.raises(ValueError, match=r'^train: KDSRModel has no KD term; set train\.output_kd_opt'):
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    _not_started(tmp_path, opt)


@pytest.mark.parametrize('term', ['output_kd_opt', 'kd_opt', 'upcycle_opt'])
def test_each_kd_term_alone_is_enough(tmp_path, term):
    from basicsr.models import build_model
    blocks = dict(output_kd_opt={'type': 'OutputKDLoss'}, kd_opt={'type': 'FitNetLoss'},
                  upcycle_opt={'zoom_in': 1, 'zoom_out': False, 'aug_prob': 0.0})
    opt = tiny_opt(tmp_path, **{term: blocks[term]})
    assert [k for k in blocks if k in opt['train']] == [term]
    model = build_model(opt)
    assert model.distiller.teacher is not None  # the teacher takes part


# ------------------------------------------------------------------ BasicSR's own train.py
def _autoload_helpers():
    spec = importlib.util.spec_from_file_location('_autoload_tests', _AUTOLOAD_TESTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_basicsr_train_py_refuses_an_unknown_key_before_iteration_1(tmp_path):
    helpers = _autoload_helpers()
    opt = tiny_metakd_opt(tmp_path / 'work', total_iter=2)
    for d in opt['datasets'].values():
        d['type'] = 'CheckedPairedImageDataset'
    opt['meat'] = opt.pop('meta')
    out = helpers._basicsr_train(tmp_path, write_yaml(opt, tmp_path / 'bad.yml'))
    assert out.returncode != 0
    assert 'meat: unknown key; did you mean meta?' in out.stderr, out.stderr[-3000:]
    exp = tmp_path / 'BasicSR' / 'experiments' / opt['name']
    log = ''.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'Start training' not in log and not list(exp.glob('models/*.pth'))
