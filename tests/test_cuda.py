"""The same models on CUDA (skipped without a GPU): device placement, a KD and a MetaKD step in
both meta modes, save and a resume mapped onto the GPU."""
import copy
import os

import pytest
import torch

from helpers import tiny_metakd_opt, tiny_opt
from basicsr.data import build_dataset
from basicsr.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def _cuda(opt):
    opt['num_gpu'] = 1
    return opt


def _batch(opt):
    ds = build_dataset(copy.deepcopy(opt['datasets']['train']))
    return torch.utils.data.default_collate([ds[0], ds[1]])


def test_kd_fitnet_on_cuda(tmp_path):
    opt = _cuda(tiny_opt(tmp_path, kd_opt=dict(type='FitNetLoss'), output_kd_opt=dict(type='OutputKDLoss')))
    model = build_model(opt)
    assert next(model.net_t.parameters()).is_cuda and next(model.distiller.parameters()).is_cuda
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    assert all(p.grad is None for p in model.net_t.parameters())
    assert model.output.is_cuda


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_metakd_on_cuda_save_and_resume(tmp_path, mode):
    opt = _cuda(tiny_metakd_opt(tmp_path, meta=dict(mode=mode)))
    for k in ('models', 'training_states'):
        os.makedirs(opt['path'][k], exist_ok=True)
    model = build_model(opt)
    assert next(model.net_kr.parameters()).is_cuda
    model.feed_data(_batch(opt))
    for it in (1, 2):
        model.optimize_parameters(it)
    assert model.get_current_log()['meta_grad_norm'] > 0
    model.save(0, 2)
    from krdistill.entry import load_resume_state
    ropt = copy.deepcopy(opt)
    ropt['path']['resume_state'] = os.path.join(opt['path']['training_states'], '2.state')
    state = load_resume_state(ropt)
    assert state['optimizers'][1]['state'][0]['exp_avg'].is_cuda
    ropt['path']['pretrain_network_g'] = os.path.join(opt['path']['models'], 'net_g_2.pth')
    resumed = build_model(ropt)
    resumed.resume_training(state)
    for a, b in zip(resumed.net_kr.parameters(), model.net_kr.parameters()):
        assert torch.equal(a, b)
    resumed.feed_data(_batch(opt))
    resumed.optimize_parameters(3)
