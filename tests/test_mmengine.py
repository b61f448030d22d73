"""MetaKD through mmengine's Runner: the tiny config trains on CPU, saves, and resumes with the
iteration, KRNets, both optimizers and the meta fallback state restored (checkpoints load with
torch's weights_only=True default)."""
import copy
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmengine')

import krdistill.mmengine  # noqa: E402,F401  (registration + checkpoint shim)
from mmengine.config import Config  # noqa: E402
from mmengine.optim import OptimWrapper  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner.checkpoint import _load_checkpoint  # noqa: E402

from krdistill.mmengine.compat import history_buffer_getattr  # noqa: E402
from krdistill.mmengine.model import MetaKDOptimWrapperConstructor, MMEngineMetaKDModel  # noqa: E402
from krdistill.mmengine.nets import TinyEDSR  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / 'options' / 'mmengine' / 'metakd_tiny_x2.py'


def _cfg(tmp_path, name, max_iters=4, **extra):
    cfg = Config.fromfile(str(CONFIG))
    teacher = tmp_path / 'teacher.pth'
    if not teacher.is_file():
        torch.manual_seed(0)
        torch.save({'params': TinyEDSR(num_feat=16, num_block=2, upscale=2).state_dict()}, teacher)
    cfg.model.teacher_ckpt = str(teacher)
    cfg.work_dir = str(tmp_path / name)
    cfg.experiment_name = name
    cfg.train_cfg.max_iters = max_iters
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.log_level = 'WARNING'
    cfg.merge_from_dict(extra)
    return cfg


def _krnets(state):
    return {k: v for k, v in state.items() if k.startswith('krnets.')}


def test_runner_trains_saves_and_resumes(tmp_path):
    runner = Runner.from_cfg(_cfg(tmp_path, 'a'))
    runner.train()
    model = runner.model
    assert isinstance(model, MMEngineMetaKDModel)
    assert runner.iter == 4 and model.mkd._calls == 4
    hub = runner.message_hub
    for key in ('loss', 'l_pix', 'l_texture', 'l_meta', 'meta_grad_norm'):
        assert hub.get_scalar(f'train/{key}').current() >= 0, key
    assert hub.get_scalar('train/meta_grad_norm').current() > 0
    # the teacher is loaded, frozen and not in the checkpoint
    ref = torch.load(tmp_path / 'teacher.pth', weights_only=True)['params']
    assert all(torch.equal(v, ref[k]) for k, v in model.teacher.state_dict().items())
    wd = Path(runner.work_dir)
    ck2, ck4 = wd / 'iter_2.pth', wd / 'iter_4.pth'
    assert ck2.is_file() and ck4.is_file()

    # torch >= 2.6 refuses mmengine's checkpoints by default; the shim loads them, still weights_only
    with pytest.raises(Exception, match='[Ww]eights'):
        torch.load(ck4, map_location='cpu')
    final = _load_checkpoint(str(ck4), map_location='cpu')
    state = final['state_dict']
    assert not any(k.startswith('teacher') for k in state)
    assert any(k.startswith('student.') for k in state) and _krnets(state)
    assert set(final['optimizer']) == {'student', 'krnets'}
    kr_state = final['optimizer']['krnets']['state']  # the KRNet Adam stepped at every iteration
    assert kr_state and all(float(s['step']) == 4 for s in kr_state.values())
    assert state['_extra_state']['calls'] == 4 and len(state['_extra_state']['last_batch']) == 2

    # resume from iteration 2 in a fresh runner: iterations 3 and 4 reproduce run a exactly
    cfg = _cfg(tmp_path, 'b', load_from=str(ck2), resume=True)
    resumed = Runner.from_cfg(cfg)
    calls = []
    orig = resumed.model.mkd.objective.meta_grad

    def spy(*args, **kwargs):
        calls.append((resumed.iter, resumed.model.mkd._calls))
        return orig(*args, **kwargs)

    resumed.model.mkd.objective.meta_grad = spy
    resumed.train()
    assert calls[0] == (2, 3), 'iteration and meta call counter (2, +1 for this call) were not restored'
    assert resumed.iter == 4
    mid = _load_checkpoint(str(ck2), map_location='cpu')['state_dict']
    assert not all(torch.equal(v, mid[k]) for k, v in _krnets(state).items()), 'KRNets did not train'
    now = resumed.model.state_dict()
    for k, v in _krnets(state).items():
        assert torch.allclose(now[k], v, rtol=1e-5, atol=1e-7), k
    for k, v in state.items():
        if k.startswith('student.'):
            assert torch.allclose(now[k], v, rtol=1e-5, atol=1e-7), k


def test_registration_and_config_errors(tmp_path):
    for name in ('MMEngineMetaKDModel', 'KRNet', 'TextureWiseLoss', 'SROutputKDLoss', 'SRFitNetLoss', 'SRATLoss',
                 'SRFAKDLoss', 'MetaKDTinyEDSR'):
        assert MODELS.get(name) is not None, name
    kr = MODELS.build(dict(type='KRNet', s_channels=8, t_channels=16, width=4))
    assert kr.width == 4
    assert float(MODELS.build(dict(type='SRATLoss'))(torch.rand(1, 4, 8, 8), torch.rand(1, 8, 8, 8))) >= 0

    cfg = _cfg(tmp_path, 'c')
    model = MODELS.build(copy.deepcopy(cfg.model))
    # an MMagic-style teacher checkpoint: state_dict with a 'generator.' prefix
    mm = tmp_path / 'mmagic_teacher.pth'
    torch.save({'meta': {'iter': 10}, 'state_dict': {f'generator.{k}': v for k, v in
                                                     model.teacher.state_dict().items()}}, mm)
    other = MODELS.build(dict(copy.deepcopy(cfg.model), teacher_ckpt=str(mm), teacher_param_key='state_dict',
                              teacher_prefix='generator.'))
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in other.teacher.state_dict().items())
    # BasicSR archs are found when the type is not in MODELS (BasicSR installed)
    pytest.importorskip('basicsr')
    bs = MODELS.build(dict(copy.deepcopy(cfg.model), teacher_ckpt=None,
                           teacher=dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2)))
    assert type(bs.teacher).__name__ == 'EDSR' and bs.krnets[0].t_channels == 16
    with pytest.raises(KeyError, match='MetaKDOptimWrapperConstructor takes keys'):
        MetaKDOptimWrapperConstructor(dict(generator=dict(optimizer=dict(type='Adam', lr=1e-3))))
    ows = MetaKDOptimWrapperConstructor(dict(student=dict(optimizer=dict(type='SGD', lr=0.1))))(model)
    assert ows['krnets'].optimizer.param_groups[0]['lr'] == 0.1  # krnets falls back on the student's settings
    n_kr = sum(p.numel() for g in ows['krnets'].optimizer.param_groups for p in g['params'])
    assert n_kr == sum(p.numel() for p in model.krnets.parameters())
    single = OptimWrapper(torch.optim.SGD(model.parameters(), 0.1))
    batch = dict(lq=torch.rand(2, 3, 8, 8), gt=torch.rand(2, 3, 16, 16))
    with pytest.raises(TypeError, match='OptimWrapperDict'):
        model.train_step(batch, single)
    with pytest.raises(RuntimeError, match='MMSeparateDistributedDataParallel'):
        model(**batch, mode='loss')  # what the default DDP wrapper would call: no silent meta-less training
    model.eval()
    assert set(model(**batch, mode='loss')) == {'l_pix', 'l_texture'}
    # pseudo_collate-style lists are stacked; predict runs the student alone
    out = model.val_step(dict(lq=list(batch['lq']), gt=list(batch['gt'])))
    assert len(out) == 2 and out[0]['pred'].shape == (3, 16, 16)


def test_restricted_getattr_refuses_anything_but_history_buffer_methods():
    import pickle
    from mmengine.logging.history_buffer import HistoryBuffer
    assert history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for obj, name in ((os, 'system'), (HistoryBuffer, '__init__'), (HistoryBuffer, '_statistics_methods')):
        with pytest.raises(pickle.UnpicklingError):
            history_buffer_getattr(obj, name)


@pytest.mark.parametrize('edit,match', [
    (dict(meta=dict(every=0)), r'model\.meta\.every'),
    (dict(meta=dict(fd_eps='1e-4')), r'model\.meta\.fd_eps.*1\.0e-4'),
    (dict(texture_opt=dict(type='TextureWiseLoss', loss_weight=-1.0)), r'model\.texture_opt\.loss_weight'),
    (dict(network_kr=dict(type='NoSuchKRNet')), r'model\.network_kr\.type'),
    (dict(pairs=[('body.1', 'body.9')]), r'model\.pairs \(student module names\).*body\.0'),
    (dict(pairs=[('body.1', )]), r'model\.pairs\[0\]'),
])
def test_option_errors_name_the_config_key(tmp_path, edit, match):
    cfg = _cfg(tmp_path, 'e')
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        MODELS.build(dict(copy.deepcopy(cfg.model), **edit))


def test_teacher_checkpoint_that_matches_too_little_is_refused(tmp_path):
    cfg = _cfg(tmp_path, 'f')
    bad = tmp_path / 'other_teacher.pth'
    torch.save({'params': TinyEDSR(num_feat=8, num_block=1, upscale=2).state_dict()}, bad)
    with pytest.raises(RuntimeError, match=r'model\.teacher_ckpt.*model\.strict_load_teacher'):
        MODELS.build(dict(copy.deepcopy(cfg.model), teacher_ckpt=str(bad)))
    with pytest.raises(RuntimeError, match=r'model\.strict_load_teacher is false.*matches only'):
        MODELS.build(dict(copy.deepcopy(cfg.model), teacher_ckpt=str(bad), strict_load_teacher=False))
