"""tools/evaluate.py / krdistill.evaluation.run: known PSNR of a known 'network' on a synthetic folder."""
import json

import cv2
import numpy as np
import torch
import yaml
from torch import nn

import krdistill  # noqa: F401
from basicsr.utils.registry import ARCH_REGISTRY
from krdistill import evaluation as ev


class NearestUpTest(nn.Module):
    """Nearest-neighbour upsampling (one dummy parameter so that a checkpoint has content)."""

    def __init__(self, scale=2):
        super().__init__()
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=self.scale, mode='nearest') + 0 * self.dummy


if 'NearestUpTest' not in ARCH_REGISTRY:
    ARCH_REGISTRY.register(NearestUpTest)


def _y(img_bgr):
    """BT.601 Y in [16, 235] (float64), computed here independently of basicsr."""
    x = img_bgr.astype(np.float64) / 255.
    return (x @ np.array([24.966, 128.553, 65.481]) + 16.0)


def _psnr(a, b, border):
    a, b = _y(a)[border:-border, border:-border], _y(b)[border:-border, border:-border]
    return 10 * np.log10(255. ** 2 / np.mean((a - b) ** 2))


def _folders(tmp_path, scale=2):
    rng = np.random.default_rng(1)
    hr_dir, lr_dir = tmp_path / 'HR', tmp_path / 'LR'
    hr_dir.mkdir()
    lr_dir.mkdir()
    expected = {}
    for i, (h, w) in enumerate(((21, 26), (30, 17))):  # not multiples of the scale: cropped to 20x26, 30x16
        hr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(hr_dir / f'im{i}.png'), hr)
        hr_c = hr[:h - h % scale, :w - w % scale]
        lr = hr_c[::scale, ::scale]
        cv2.imwrite(str(lr_dir / f'im{i}.png'), lr)
        sr = np.repeat(np.repeat(lr, scale, 0), scale, 1)
        expected[f'im{i}'] = _psnr(sr, hr_c, scale)
    return hr_dir, lr_dir, expected


def test_evaluate_nearest_network_known_psnr(tmp_path, capsys):
    hr_dir, lr_dir, expected = _folders(tmp_path)
    ckpt = tmp_path / 'net.pth'
    torch.save({'params': NearestUpTest(2).state_dict()}, ckpt)
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'network_g': {'type': 'NearestUpTest', 'scale': 2}}))
    out = tmp_path / 'res.json'
    res = ev.run([str(ckpt), '-opt', str(opt), '--hr-dir', str(hr_dir), '--lr-dir', str(lr_dir), '--scale', '2',
                  '--json', str(out)])
    got = {r['name']: r['psnr'] for r in res['net']['images']}
    for k, v in expected.items():
        assert abs(got[k] - v) < 1e-3, (k, got[k], v)
    assert abs(res['net']['psnr'] - np.mean(list(expected.values()))) < 1e-3
    data = json.loads(out.read_text())
    assert data['scale'] == 2 and data['border'] == 2 and 'net' in data['results']
    assert '| net |' in capsys.readouterr().out


def test_evaluate_noise_known_psnr_and_run_folder(tmp_path):
    """HR vs HR + known noise (identity 'network' on x1 would be trivial; here the Y-channel noise
    PSNR is computed directly), and a benchmark run folder is found and evaluated with its network."""
    rng = np.random.default_rng(2)
    hr = rng.integers(20, 236, (24, 24, 3), dtype=np.uint8)
    noisy = np.clip(hr.astype(np.int16) + rng.integers(-3, 4, hr.shape), 0, 255).astype(np.uint8)
    psnr, ssim = ev.y_psnr_ssim(noisy, hr, border=2)
    assert abs(psnr - _psnr(noisy, hr, 2)) < 1e-3 and 0 < ssim < 1

    hr_dir, _, _ = _folders(tmp_path)
    run = tmp_path / 'bench' / 'runs' / 'nearest_s0'
    run.mkdir(parents=True)
    torch.save({'params': NearestUpTest(2).state_dict()}, run / 'student.pth')
    (run / 'result.json').write_text(json.dumps({'network': {'type': 'NearestUpTest', 'scale': 2}}))
    res = ev.evaluate_checkpoints([tmp_path / 'bench'], hr_dir, 2, bicubic=True)  # LR made by MATLAB bicubic
    assert set(res) == {'bicubic', 'nearest_s0'}
    pairs = ev.load_pairs(hr_dir, 2)
    assert [p['hr'].shape[:2] for p in pairs] == [(20, 26), (30, 16)]
    assert [p['lr'].shape[:2] for p in pairs] == [(10, 13), (15, 8)]
    for p, r in zip(pairs, res['nearest_s0']['images']):
        sr = np.repeat(np.repeat(p['lr'], 2, 0), 2, 1)
        assert abs(r['psnr'] - _psnr(sr, p['hr'], 2)) < 1e-3


def test_presets_build():
    net = ev.build_network(ev.PRESETS['edsr-f16b4-x4'])
    n = sum(p.numel() for p in net.parameters())
    assert 35_000 < n < 45_000  # EDSR 16/4 x4: 0.040 M (CPU-PROTOCOL.md)


class SquareUpTest(NearestUpTest):
    """Nearest upsampling plus ``dummy ** 2``: finite weights whose output overflows for a large dummy."""

    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=self.scale, mode='nearest') + self.dummy * self.dummy


if 'SquareUpTest' not in ARCH_REGISTRY:
    ARCH_REGISTRY.register(SquareUpTest)


def test_evaluate_refuses_to_score_a_non_finite_output(tmp_path, capsys):
    """Finite weights (1e30) whose output overflows to inf: not scored, the image is named, exit code 1."""
    hr_dir, lr_dir, _ = _folders(tmp_path)
    ckpt = tmp_path / 'overflow.pth'
    torch.save({'params': {'dummy': torch.tensor([1e30])}}, ckpt)
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'network_g': {'type': 'SquareUpTest', 'scale': 2}}))
    args = [str(ckpt), '-opt', str(opt), '--hr-dir', str(hr_dir), '--lr-dir', str(lr_dir), '--scale', '2']
    assert ev.main(args) == 1
    err = capsys.readouterr().err
    assert 'overflow.pth' in err and 'im0' in err and 'non-finite' in err and 'not scored' in err
    torch.save({'params': {'dummy': torch.tensor([1.0])}}, ckpt)  # the same network with a finite output scores
    assert ev.main(args) == 0 and '| overflow |' in capsys.readouterr().out


def test_evaluate_scale_that_is_not_the_networks_names_scale(tmp_path):
    """An x2 checkpoint scored with --scale 4 is refused naming --scale and the network's factor
    (before, the message compared image shapes); --scale 0 is an argument error (exit 2)."""
    import pytest
    hr_dir, _, _ = _folders(tmp_path)
    ckpt = tmp_path / 'net.pth'
    torch.save({'params': NearestUpTest(2).state_dict()}, ckpt)
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'network_g': {'type': 'NearestUpTest', 'scale': 2}}))
    with pytest.raises(ValueError, match=r'^--scale: 4, but checkpoint .* upscales by 2'):
        ev.run([str(ckpt), '-opt', str(opt), '--hr-dir', str(hr_dir), '--scale', '4'])
    with pytest.raises(SystemExit) as e:
        ev.run([str(ckpt), '-opt', str(opt), '--hr-dir', str(hr_dir), '--scale', '0'])
    assert e.value.code == 2
