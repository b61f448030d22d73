"""tools/kr_picture.py: the picture of what a run's KRNets transfer, for one image, from its checkpoints."""
import os
import sys

import cv2
import numpy as np
import pytest
import torch

from helpers import tiny_metakd_opt, write_yaml
from krdistill.train import main as train_main

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import kr_picture  # noqa: E402  (tools/kr_picture.py)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('krpic')
    opt = tiny_metakd_opt(tmp, total_iter=4)
    opt['network_kr'].update(fitnet_branch=True, texture_init=0.5)
    opt['name'] = 'krpic'
    opt['logger'].update(print_freq=2, save_checkpoint_freq=2)
    opt['val']['val_freq'] = 100
    yml = write_yaml(opt, tmp / 'krpic.yml')
    train_main(['-opt', str(yml)], root_path=str(tmp))
    return tmp, yml, opt


def test_picture_of_a_run_for_one_image_with_the_weights_over_its_checkpoints(run):
    tmp, yml, opt = run
    exp = tmp / 'experiments' / 'krpic'
    assert kr_picture.saved_iterations(exp / 'models') == [2, 4]
    image = sorted((tmp / 'data' / 'LR').glob('*.png'))[0]
    out = kr_picture.main(['-opt', str(yml), '--image', str(image), '--experiment', str(exp),
                           '--out', str(tmp / 'pic.png')])
    pic = cv2.imread(str(out))
    assert pic is not None

    # the same picture without the history strip: the tool added the weights over 2 checkpoints
    mkd = kr_picture.build(yaml_load(yml))
    kr_picture.load_iteration(mkd, exp / 'models', 4)
    img = cv2.imread(str(image))
    lq = torch.from_numpy(img[..., ::-1].astype('float32').transpose(2, 0, 1).copy())[None] / 255.
    from krdistill.kr_picture import draw_points
    bare = draw_points(mkd, lq)
    assert pic.shape[1] == bare.shape[1] and pic.shape[0] > bare.shape[0]
    assert np.array_equal(pic[:bare.shape[0]], bare)  # kernels and maps: those of iteration 4

    # the weights it drew differ between the checkpoints: the KRNets were meta-learned in between
    kr_picture.load_iteration(mkd, exp / 'models', 2)
    w2 = kr_picture.image_weights(mkd, lq)['body.0']
    kr_picture.load_iteration(mkd, exp / 'models', 4)
    w4 = kr_picture.image_weights(mkd, lq)['body.0']
    assert len(w2) == opt['network_kr']['num_kernels'] and w2 != w4


def test_earlier_iteration_and_clear_errors(run):
    tmp, yml, _ = run
    exp = tmp / 'experiments' / 'krpic'
    image = sorted((tmp / 'data' / 'LR').glob('*.png'))[0]
    out = kr_picture.main(['-opt', str(yml), '--image', str(image), '--experiment', str(exp), '--iter', '2'])
    assert out == exp / 'visualization' / f'kr_2_{image.stem}.png' and out.is_file()
    with pytest.raises(ValueError, match=r'--iter 3.*saved: \[2, 4\]'):
        kr_picture.main(['-opt', str(yml), '--image', str(image), '--experiment', str(exp), '--iter', '3'])
    with pytest.raises(FileNotFoundError, match='--experiment'):
        kr_picture.main(['-opt', str(yml), '--image', str(image), '--experiment', str(tmp / 'nothing')])


def yaml_load(path):
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)
