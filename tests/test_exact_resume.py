"""A resumed run continues where the uninterrupted run would: same batches, same augmentation,
same losses (issue "Scale and reliability", item 2; ``krdistill/resume.py``).

Through BasicSR's real ``train_pipeline``: run A trains 14 iterations straight; run B (same options
and seed) is interrupted at iteration 8 (an exception, after the checkpoint of iteration 5, which
falls mid-epoch: 4 batches per epoch) and resumed with ``--auto_resume``. Every iteration B trains
after the resume must see A's batch and give A's losses exactly (CPU, deterministic).
"""
import copy

import pytest
import torch

from helpers import tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.models.kd_model import KDSRModel
from krdistill.train import main as train_main

TOTAL, SAVE_EVERY, STOP_AT = 14, 5, 8


class Interrupted(Exception):
    pass


def _options(root, model_type, name):
    if model_type == 'MetaKDModel':  # meta every 2: the meta fallback batch crosses the resume
        opt = tiny_metakd_opt(root, meta=dict(every=2), total_iter=TOTAL)
    elif model_type == 'MetaKDModel-horizon':  # the horizon traces cross the resume
        opt = tiny_metakd_opt(root, meta=dict(every=2, objective='horizon', horizon_decay=0.9, horizon_stride=2,
                                              virtual_step='optimizer'), total_iter=TOTAL)
        opt['network_kr'].update(fitnet_branch=True, texture_init=0.2)
    elif model_type == 'KDSRModel-dukd':  # random tiles and augmentations cross the resume
        opt = tiny_opt(root, total_iter=TOTAL, output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                       upcycle_opt=dict(zoom_in=2, zoom_out=True, aug_prob=0.5, steps=2))
    else:
        opt = tiny_opt(root, total_iter=TOTAL, output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                       kd_opt=dict(type='FitNetLoss', loss_weight=0.1))
    opt['name'] = name
    opt['datasets']['train']['dataset_enlarge_ratio'] = 2  # 4 images x 2 / batch 2 = 4 batches per epoch
    opt['val']['val_freq'] = 1000
    opt['logger'].update(print_freq=100, save_checkpoint_freq=SAVE_EVERY)
    return opt


@pytest.mark.parametrize('model_type', ['MetaKDModel', 'MetaKDModel-horizon', 'KDSRModel', 'KDSRModel-dukd'])
def test_resumed_losses_continue_like_uninterrupted(tmp_path, monkeypatch, model_type):
    monkeypatch.chdir(tmp_path)
    record = {}
    cls = KDSRModel if model_type.startswith('KDSRModel') else None
    if cls is None:
        from krdistill.models.metakd_model import MetaKDModel as cls
    orig = cls.optimize_parameters

    def optimize_parameters(self, current_iter):
        if record.get('stop_at') == current_iter:
            raise Interrupted
        batch = (float(self.lq.double().sum()), float(self.gt.double().sum()))
        orig(self, current_iter)
        losses = {k: float(v) for k, v in self.log_dict.items() if not k.startswith('t_')}  # not timings
        record['run'].append((current_iter, batch, losses))

    monkeypatch.setattr(cls, 'optimize_parameters', optimize_parameters)

    record['run'] = straight = []
    yml_a = write_yaml(_options(tmp_path, model_type, 'straight'), tmp_path / 'a.yml')
    train_main(['-opt', str(yml_a)], root_path=str(tmp_path))
    assert [it for it, _, _ in straight] == list(range(1, TOTAL + 1))

    record['run'] = before = []
    record['stop_at'] = STOP_AT
    yml_b = write_yaml(_options(tmp_path, model_type, 'interrupted'), tmp_path / 'b.yml')
    with pytest.raises(Interrupted):
        train_main(['-opt', str(yml_b)], root_path=str(tmp_path))
    assert before == straight[:STOP_AT - 1]  # same start (sanity)

    record['run'] = after = []
    record['stop_at'] = None
    train_main(['-opt', str(yml_b), '--auto_resume'], root_path=str(tmp_path))
    log = ''.join(p.read_text() for p in (tmp_path / 'experiments' / 'interrupted').glob('train_*.log'))
    assert 'iter: 5.' in log and 'Resuming mid-epoch: epoch 1 continues after the 1 of its 4 batches' in log

    assert [it for it, _, _ in after] == list(range(SAVE_EVERY + 1, TOTAL + 1))
    for (it, batch, losses), (it_a, batch_a, losses_a) in zip(after, straight[SAVE_EVERY:]):
        assert it == it_a
        assert batch == batch_a, f'iter {it}: another batch than the uninterrupted run'
        assert losses == losses_a, f'iter {it}: {losses} != {losses_a}'
    a = torch.load(tmp_path / 'experiments' / 'straight' / 'models' / 'net_g_latest.pth', map_location='cpu')
    b = torch.load(tmp_path / 'experiments' / 'interrupted' / 'models' / 'net_g_latest.pth', map_location='cpu')
    for k, v in a['params'].items():
        assert torch.equal(v, b['params'][k]), k
    if model_type == 'MetaKDModel-horizon':  # what the resume restored: the traces and a moving b_tex
        state = torch.load(tmp_path / 'experiments' / 'interrupted' / 'training_states' / '5.state',
                           map_location='cpu', weights_only=True)
        assert state['krdistill']['ranks'][0]['meta_state']['horizon']['z'][0]
        assert len({round(losses['kr0_texture_gain'], 9) for _, _, losses in straight}) > 2


def test_training_state_holds_rng_per_rank(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opt = _options(tmp_path, 'MetaKDModel', 'states')
    train_main(['-opt', str(write_yaml(opt, tmp_path / 's.yml'))], root_path=str(tmp_path))
    state = torch.load(tmp_path / 'experiments' / 'states' / 'training_states' / '10.state', map_location='cpu',
                       weights_only=True)  # plain values only (krdistill/resume.py)
    ranks = state['krdistill']['ranks']
    assert len(ranks) == 1
    assert set(ranks[0]['rng']) == {'python', 'numpy', 'torch', 'cuda'}
    assert len(ranks[0]['meta_state']['last_batch']) == 2  # the meta fallback batch (lq, gt)
    assert state['epoch'] == 2 and state['iter'] == 10


def test_skip_rejects_a_changed_dataset():
    from krdistill.resume import skip_consumed_batches
    sampler = torch.utils.data.SequentialSampler(range(8))
    loader = torch.utils.data.DataLoader(range(8), batch_size=2, sampler=sampler, drop_last=True)
    assert skip_consumed_batches(loader, epoch=1, current_iter=6, batch_size=2) == 2
    assert [b.tolist() for b in loader] == [[4, 5], [6, 7]]
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # only the next pass skips
    with pytest.raises(ValueError, match='batch_size_per_gpu'):
        skip_consumed_batches(loader, epoch=0, current_iter=9, batch_size=2)
