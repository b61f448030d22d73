"""The KD terms, texture weights and meta-gradient norm reach TensorBoard through BasicSR's logger."""
import glob
import os

import pytest

from helpers import tiny_metakd_opt, tiny_opt, write_yaml
from krdistill.train import main as train_main

pytest.importorskip('tensorboard')


def _tags(root, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = glob.glob(os.path.join(root, 'tb_logger', name, 'events.out.tfevents.*'))
    assert files, os.listdir(root)
    acc = EventAccumulator(files[0])
    acc.Reload()
    return set(acc.Tags()['scalars'])


@pytest.mark.parametrize('model', ['KDSRModel', 'MetaKDModel'])
def test_tensorboard_event_file_holds_the_kd_log_keys(tmp_path, model):
    if model == 'MetaKDModel':
        opt = tiny_metakd_opt(tmp_path, total_iter=4, output_kd_opt=dict(type='OutputKDLoss', loss_weight=0.5))
        opt['network_kr']['fitnet_branch'] = True
        opt['network_kr']['texture_init'] = 0.5
        want = {'losses/l_pix', 'losses/l_texture', 'losses/l_kd_out', 'losses/l_meta', 'meta_grad_norm',
                'kr0_texture_gain', 'kr0_texture_entropy', 'kr0_fitnet_weight'}
    else:
        opt = tiny_opt(tmp_path, total_iter=4, kd_opt=dict(type='FitNetLoss'),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=0.5))
        want = {'losses/l_pix', 'losses/l_kd_fitnet', 'losses/l_kd_out'}
    opt['name'] = f'tb_{model}'
    opt['logger'].update(print_freq=2, save_checkpoint_freq=100, use_tb_logger=True)
    opt['val']['val_freq'] = 100
    train_main(['-opt', str(write_yaml(opt, tmp_path / 'tb.yml'))], root_path=str(tmp_path))
    tags = _tags(tmp_path, opt['name'])
    assert want <= tags, sorted(tags)


def test_kr_picture_is_written_at_its_frequency(tmp_path):
    import cv2
    opt = tiny_metakd_opt(tmp_path, total_iter=4)
    opt['network_kr']['fitnet_branch'] = True
    opt['name'] = 'kr_picture'
    opt['logger'].update(print_freq=2, save_checkpoint_freq=100, kr_picture_freq=2)
    opt['val']['val_freq'] = 100
    train_main(['-opt', str(write_yaml(opt, tmp_path / 'pic.yml'))], root_path=str(tmp_path))
    vis = tmp_path / 'experiments' / 'kr_picture' / 'visualization'
    assert sorted(p.name for p in vis.glob('kr_*.png')) == ['kr_2.png', 'kr_4.png']
    img = cv2.imread(str(vis / 'kr_4.png'))
    n = opt['network_kr']['num_kernels']
    assert img is not None and img.shape[1] >= n * 96 and img.shape[0] >= 4 * 96  # kernels + 3 map rows
