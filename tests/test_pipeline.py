"""End to end through BasicSR's real ``train_pipeline``: train, validate, checkpoint, auto-resume,
and load the student in vanilla ``SRModel``."""
import copy
import glob
import os

import pytest
import torch

from helpers import tiny_opt, write_yaml
from basicsr.models import build_model
from basicsr.models.sr_model import SRModel
from krdistill.train import main as train_main


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('pipeline')
    opt = tiny_opt(root, total_iter=20, kd_opt=dict(type='FitNetLoss', loss_weight=0.01),
                   output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0))
    yml = write_yaml(opt, root / 'tiny.yml')
    train_main(['-opt', str(yml)], root_path=str(root))
    return root, opt, yml


def _log_text(exp):
    return ''.join(open(f).read() for f in sorted(glob.glob(str(exp / 'train_*.log'))))


def test_train_writes_checkpoints_and_validates(trained):
    root, opt, _ = trained
    exp = root / 'experiments' / opt['name']
    for name in ('net_g_10.pth', 'net_g_20.pth', 'net_g_latest.pth', 'net_kd_20.pth'):
        assert (exp / 'models' / name).is_file(), name
    assert not list((exp / 'models').glob('net_t_*')), 'the teacher must never be saved'
    assert (exp / 'training_states' / '20.state').is_file()
    assert not (root / 'experiments' / opt['name']).samefile(os.getcwd())


def test_resume_restores_optimizer_and_regressor(trained):
    root, opt, _ = trained
    exp = root / 'experiments' / opt['name']
    state = torch.load(exp / 'training_states' / '20.state', map_location='cpu', weights_only=False)
    ropt = copy.deepcopy(opt)
    ropt['path']['resume_state'] = str(exp / 'training_states' / '20.state')
    ropt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_20.pth')
    model = build_model(ropt)
    model.resume_training(state)
    saved_kd = torch.load(exp / 'models' / 'net_kd_20.pth', map_location='cpu')['params']
    for k, v in model.distiller.state_dict().items():
        assert torch.equal(v, saved_kd[k]), k
    fresh = build_model(copy.deepcopy(opt))
    assert not torch.equal(fresh.distiller.state_dict()['pair_losses.0.regressor.weight'],
                           saved_kd['pair_losses.0.regressor.weight'])
    restored = model.optimizer_g.state_dict()
    assert len(restored['param_groups']) == 2  # student + regressor
    for pid, s in state['optimizers'][0]['state'].items():
        assert torch.equal(restored['state'][pid]['exp_avg'], s['exp_avg'])
        assert int(restored['state'][pid]['step']) == 20


def test_auto_resume_continues_from_saved_iteration(trained, monkeypatch):
    root, opt, _ = trained
    opt2 = copy.deepcopy(opt)
    opt2['train']['total_iter'] = 30
    yml = write_yaml(opt2, root / 'tiny30.yml')
    monkeypatch.chdir(root)
    train_main(['-opt', str(yml), '--auto_resume'], root_path=str(root))
    exp = root / 'experiments' / opt['name']
    log = _log_text(exp)
    assert 'Resuming training from epoch' in log and 'iter: 20.' in log
    assert 'Resumed training-only network net_kd' in log
    assert (exp / 'models' / 'net_g_30.pth').is_file()
    assert not (exp / 'models' / 'net_g_40.pth').exists()


def test_student_loads_in_vanilla_srmodel_bit_identical(trained):
    root, opt, _ = trained
    exp = root / 'experiments' / opt['name']
    vopt = copy.deepcopy(opt)
    vopt.update(model_type='SRModel', is_train=False)
    vopt['path'] = dict(pretrain_network_g=str(exp / 'models' / 'net_g_20.pth'), strict_load_g=True,
                        param_key_g='params')
    for k in ('network_t', 'kd'):
        vopt.pop(k)
    vanilla = build_model(vopt)
    assert type(vanilla) is SRModel
    kd = build_model(dict(copy.deepcopy(opt), path=dict(copy.deepcopy(opt['path']),
                                                       pretrain_network_g=str(exp / 'models' / 'net_g_20.pth'))))
    lq = torch.rand(1, 3, 12, 12)
    vanilla.net_g.eval()
    kd.net_g.eval()
    with torch.no_grad():
        assert torch.equal(vanilla.net_g(lq), kd.net_g(lq))
