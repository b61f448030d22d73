"""MetaKD through BasicSR's train_pipeline: net_kr checkpoints, resume of KRNets, optimizer_kr and
its scheduler, and a student that exports to vanilla BasicSR with bit-identical outputs."""
import copy
import glob
import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import tiny_metakd_opt, write_yaml
from basicsr.models import build_model
from krdistill.train import main as train_main

TOOLS = Path(__file__).resolve().parents[1] / 'tools'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('metakd_pipeline')
    opt = tiny_metakd_opt(root, total_iter=20)
    opt['name'] = 'tiny_metakd'
    opt['train']['scheduler'] = dict(type='MultiStepLR', milestones=[15], gamma=0.5)
    opt['meta']['dataset'] = dict(copy.deepcopy(opt['datasets']['train']), name='meta')
    for k in ('experiments_root', 'models', 'training_states', 'log', 'visualization'):
        opt['path'][k] = opt['path'][k].replace('tiny_kd', 'tiny_metakd')
    yml = write_yaml(opt, root / 'metakd.yml')
    train_main(['-opt', str(yml)], root_path=str(root))
    return root, opt


def test_checkpoints(run):
    root, opt = run
    models = root / 'experiments' / opt['name'] / 'models'
    for name in ('net_g_10.pth', 'net_kr_10.pth', 'net_g_20.pth', 'net_kr_20.pth', 'net_g_latest.pth'):
        assert (models / name).is_file(), name
    assert not list(models.glob('net_t_*')) and not list(models.glob('net_kd_*'))
    log = ''.join(open(f).read() for f in glob.glob(str(root / 'experiments' / opt['name'] / 'train_*.log')))
    assert 'l_texture' in log and 'l_meta' in log and 't_meta' in log
    assert 'meta batches from meta.dataset' in log


def test_resume_restores_krnet_optimizer_and_scheduler(run):
    root, opt = run
    exp = root / 'experiments' / opt['name']
    state = torch.load(exp / 'training_states' / '20.state', map_location='cpu', weights_only=False)
    ropt = copy.deepcopy(opt)
    ropt['path']['resume_state'] = str(exp / 'training_states' / '20.state')
    ropt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_20.pth')
    model = build_model(ropt)
    model.resume_training(state)
    saved_kr = torch.load(exp / 'models' / 'net_kr_20.pth', map_location='cpu')['params']
    for k, v in model.net_kr.state_dict().items():
        assert torch.equal(v, saved_kr[k]), k
    assert len(model.optimizers) == 2 and model.optimizers[1] is model.optimizer_kr
    kr_state = model.optimizer_kr.state_dict()
    for pid, s in state['optimizers'][1]['state'].items():
        assert torch.equal(kr_state['state'][pid]['exp_avg_sq'], s['exp_avg_sq'])
    assert model.schedulers[1].last_epoch == state['schedulers'][1]['last_epoch'] == 19
    # the milestone at 15 halved both learning rates, and resume keeps that
    assert model.optimizer_kr.param_groups[0]['lr'] == pytest.approx(5e-4)


def test_auto_resume(run, monkeypatch):
    root, opt = run
    opt2 = copy.deepcopy(opt)
    opt2['train']['total_iter'] = 30
    monkeypatch.chdir(root)
    train_main(['-opt', str(write_yaml(opt2, root / 'metakd30.yml')), '--auto_resume'], root_path=str(root))
    exp = root / 'experiments' / opt['name']
    assert (exp / 'models' / 'net_kr_30.pth').is_file()
    log = ''.join(open(f).read() for f in sorted(glob.glob(str(exp / 'train_*.log'))))
    assert 'Resumed training-only network net_kr' in log


def test_exported_student_is_bit_identical_in_vanilla_basicsr(run, tmp_path):
    root, opt = run
    spec = importlib.util.spec_from_file_location('export_student', TOOLS / 'export_student.py')
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    out = tmp_path / 'student.pth'
    export.main([str(root / 'experiments' / opt['name'] / 'models' / 'net_g_20.pth'), '-o', str(out)])
    vopt = copy.deepcopy(opt)
    vopt.update(model_type='SRModel', is_train=False)
    vopt['path'] = dict(pretrain_network_g=str(out), strict_load_g=True, param_key_g='params')
    for k in ('network_t', 'network_kr', 'kd', 'meta'):
        vopt.pop(k)
    vanilla = build_model(vopt)
    trained = build_model(dict(copy.deepcopy(opt), path=dict(
        copy.deepcopy(opt['path']), pretrain_network_g=str(root / 'experiments' / opt['name'] / 'models' /
                                                           'net_g_20.pth'))))
    assert type(vanilla).__name__ == 'SRModel'
    assert sum(p.numel() for p in vanilla.net_g.parameters()) == sum(p.numel() for p in trained.net_g.parameters())
    lq = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(vanilla.net_g.eval()(lq), trained.net_g.eval()(lq))
