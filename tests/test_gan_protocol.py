"""tools/gan_protocol.py (the CPU GAN-KD protocol) end to end with ``--smoke`` on tiny synthetic data.

The shipped protocol file is used with its data folders and networks made tiny; every stage goes
through ``krdistill-train`` as in the real run. What is checked: every row is trained and scored with
finite PSNR / SSIM / NIQE / PSNR-to-teacher, the crops picture has one tile per image, a second call
trains nothing, and ``--seeds`` reports a subset and refuses a seed the protocol does not have.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from helpers import synthetic_image, write_pairs
import gan_protocol as gp  # tools/ (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=4, res_scale=1,
                img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])


@pytest.fixture(scope='module')
def protocol(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ganproto')
    rng = np.random.default_rng(0)
    (tmp / 'data' / 'train').mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(tmp / 'data' / 'train' / f'im{i}.png'), synthetic_image(96, rng))
    write_pairs(tmp / 'data' / 'test', n=1, size=384, scale=4)  # NIQE needs several 96-px blocks
    cfg = yaml.safe_load((ROOT / 'options/bench/cpu_gan_x4.yml').read_text())
    cfg['data'] = dict(train_hr=['train'], exclude=[], test={'tiny': dict(hr='test/HR', lr='test/LR')},
                       crops='tiny')
    cfg['teacher']['network'] = dict(TINY_NET)
    cfg['student']['network'] = dict(TINY_NET, num_block=1)
    cfg['gan']['network_d'] = dict(cfg['gan']['network_d'], num_feat=4)
    cfg['kd'] = dict(teacher_layers=['body.1'], student_layers=['body.0'])
    opt = tmp / 'proto.yml'
    opt.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp / 'out'
    assert gp.main(['-opt', str(opt), '--data-root', str(tmp / 'data'), '--out', str(out), '--smoke']) == 0
    return cfg, opt, tmp, out


def test_every_row_is_trained_and_scored(protocol):
    cfg, _, _, out = protocol
    res = json.loads((out / 'results.json').read_text())
    assert set(res['rows']) == set(cfg['methods'])
    for method, per_set in res['rows'].items():
        (scores,) = per_set['tiny']  # one smoke seed
        for key in ('psnr', 'ssim', 'niqe', 'psnr_to_teacher'):
            assert np.isfinite(scores[key]), (method, key)
        assert (out / 'experiments' / f'{method}_s0' / 'models' / 'net_g_latest.pth').is_file()
    # the distilled rows ran KDSRGANModel against the GAN teacher, the reference BasicSR's SRGANModel
    opts = {m: yaml.safe_load((out / 'options' / f'{m}_s0.yml').read_text()) for m in cfg['methods']}
    assert opts['student_alone']['model_type'] == 'SRGANModel' and 'network_t' not in opts['student_alone']
    assert opts['output_kd']['model_type'] == 'KDSRGANModel'
    assert opts['output_kd']['path']['pretrain_network_t'].endswith('net_g_latest.pth')
    assert 'teacher_gan' in opts['output_kd']['path']['pretrain_network_t']
    table = (out / 'results.md').read_text()
    assert 'NIQE' in table and 'PSNR to teacher' in table and 'output_kd' in table


def test_crops_picture_has_a_tile_per_image(protocol):
    cfg, _, _, out = protocol
    img = cv2.imread(str(out / 'gan_crops.png'))
    tiles = 2 + len(cfg['methods'])  # HR, teacher, every row
    assert img is not None and img.shape[1] == tiles * (96 * 3 + 8)  # a 96-px window, zoomed 3x, 4-px borders


def test_second_call_trains_nothing_and_seed_subset(protocol, capsys):
    _, opt, tmp, out = protocol
    stamps = {p: p.stat().st_mtime_ns for p in out.glob('experiments/*/models/net_g_latest.pth')}
    assert gp.main(['-opt', str(opt), '--data-root', str(tmp / 'data'), '--out', str(out), '--smoke',
                    '--seeds', '0']) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob('experiments/*/models/net_g_latest.pth')} == stamps
    with pytest.raises(SystemExit, match=r'--seeds \[7\] not in train.seeds'):
        gp.main(['-opt', str(opt), '--data-root', str(tmp / 'data'), '--out', str(out), '--seeds', '7'])


@pytest.mark.parametrize('diffs,need', [([0.1, 0.1], None), ([0.1, 0.12, 0.08], 2), ([0.1, -0.1, 0.05], 156),
                                        ([0.3], None)])
def test_seeds_needed(diffs, need):
    if need is None and len(diffs) > 1:  # no spread: any 2 seeds resolve it
        assert gp.seeds_needed(diffs) == 2
    else:
        assert gp.seeds_needed(diffs) == need
