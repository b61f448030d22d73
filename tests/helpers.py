"""Tiny, hermetic fixtures: synthetic SR pairs, tiny teachers and option dicts (CPU, seconds)."""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

import krdistill  # noqa: F401  (shims before basicsr)
from basicsr.archs import build_network
from basicsr.utils.matlab_functions import imresize

TINY_T = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=16, num_block=2, upscale=2, res_scale=1,
              img_range=255., rgb_mean=[0.4488, 0.4371, 0.4040])
TINY_S = dict(TINY_T, num_feat=8, num_block=1)


def synthetic_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour field plus a few edges: something an SR net can learn from (uint8 HWC BGR)."""
    small = rng.random((size // 8, size // 8, 3)).astype(np.float32)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(3):
        x0, y0 = rng.integers(0, size, 2)
        cv2.line(img, (int(x0), 0), (int(y0), size - 1), tuple(float(v) for v in rng.random(3)), 1)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def write_pairs(root: Path, n: int = 4, size: int = 32, scale: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """Write ``n`` HR/LR png pairs under ``root/{HR,LR}``; returns the two folders."""
    rng = np.random.default_rng(seed)
    hr_dir, lr_dir = Path(root) / 'HR', Path(root) / 'LR'
    hr_dir.mkdir(parents=True, exist_ok=True)
    lr_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hr = synthetic_image(size, rng)
        lr = imresize(hr.astype(np.float32) / 255., 1 / scale)
        cv2.imwrite(str(hr_dir / f'img{i:03d}.png'), hr)
        cv2.imwrite(str(lr_dir / f'img{i:03d}.png'), (np.clip(lr, 0, 1) * 255).round().astype(np.uint8))
    return hr_dir, lr_dir


def save_teacher(path: Path, net_opt: dict = TINY_T, seed: int = 0, key: str = 'params') -> Path:
    torch.manual_seed(seed)
    net = build_network(copy.deepcopy(net_opt))
    torch.save({key: net.state_dict()}, path)
    return Path(path)


def tiny_opt(tmp_path: Path, model_type: str = 'KDSRModel', total_iter: int = 4, **train_extra) -> dict:
    """A complete option dict for a tiny KD run at x2 on synthetic data under ``tmp_path``.

    A ``KDSRModel`` needs a KD term: without ``kd_opt``, ``output_kd_opt`` or ``upcycle_opt`` in
    ``train_extra`` the run gets output KD (``OutputKDLoss``); pop it to try a run without one.
    """
    if model_type == 'KDSRModel' and not any(k in train_extra for k in ('kd_opt', 'output_kd_opt', 'upcycle_opt')):
        train_extra['output_kd_opt'] = dict(type='OutputKDLoss', loss_weight=1.0)
    tmp_path = Path(tmp_path)
    if not (tmp_path / 'data' / 'HR').is_dir():
        write_pairs(tmp_path / 'data', n=4, size=32, scale=2, seed=0)
    teacher = tmp_path / 'teacher.pth'
    if not teacher.is_file():
        save_teacher(teacher)
    data = dict(type='CheckedPairedImageDataset', dataroot_gt=str(tmp_path / 'data' / 'HR'),
                dataroot_lq=str(tmp_path / 'data' / 'LR'), io_backend=dict(type='disk'))
    train = dict(
        ema_decay=0, optim_g=dict(type='Adam', lr=1e-3, betas=[0.9, 0.99]),
        scheduler=dict(type='MultiStepLR', milestones=[1000], gamma=0.5), total_iter=total_iter, warmup_iter=-1,
        pixel_opt=dict(type='L1Loss', loss_weight=1.0, reduction='mean'))
    train.update(train_extra)
    return dict(
        name='tiny_kd', model_type=model_type, scale=2, num_gpu=0, manual_seed=0, is_train=True, dist=False,
        rank=0, world_size=1, auto_resume=False, root_path=str(tmp_path),
        datasets=dict(
            train=dict(data, name='train', phase='train', scale=2, gt_size=16, use_hflip=True, use_rot=True,
                       num_worker_per_gpu=0, batch_size_per_gpu=2, dataset_enlarge_ratio=1, prefetch_mode=None),
            val=dict(data, name='val', phase='val', scale=2)),
        network_g=copy.deepcopy(TINY_S), network_t=copy.deepcopy(TINY_T),
        path=dict(pretrain_network_g=None, strict_load_g=True, resume_state=None, pretrain_network_t=str(teacher),
                  param_key_t='params', strict_load_t=True, ignore_resume_networks=['network_t'],
                  experiments_root=str(tmp_path / 'experiments' / 'tiny_kd'),
                  models=str(tmp_path / 'experiments' / 'tiny_kd' / 'models'),
                  training_states=str(tmp_path / 'experiments' / 'tiny_kd' / 'training_states'),
                  log=str(tmp_path / 'experiments' / 'tiny_kd'),
                  visualization=str(tmp_path / 'experiments' / 'tiny_kd' / 'visualization')),
        kd=dict(teacher_layers=['body.1'], student_layers=['body.0']),
        train=train,
        val=dict(val_freq=10, save_img=False, metrics=dict(psnr=dict(type='calculate_psnr', crop_border=2,
                                                                     test_y_channel=True))),
        logger=dict(print_freq=5, save_checkpoint_freq=10, use_tb_logger=False),
    )


def write_yaml(opt: dict, path: Path) -> Path:
    """Write an option dict as a YAML file for ``train.py`` (drops keys parse_options derives)."""
    opt = copy.deepcopy(opt)
    for k in ('is_train', 'dist', 'rank', 'world_size', 'auto_resume', 'root_path'):
        opt.pop(k, None)
    for k in ('experiments_root', 'models', 'training_states', 'log', 'visualization'):
        opt['path'].pop(k, None)
    for d in opt['datasets'].values():
        d.pop('phase', None)
        d.pop('scale', None)
    Path(path).write_text(yaml.safe_dump(opt, sort_keys=False))
    return Path(path)


def tiny_metakd_opt(tmp_path: Path, meta: dict | None = None, **train_extra) -> dict:
    """``tiny_opt`` for ``MetaKDModel`` with a small KRNet and the texture loss."""
    extra = dict(texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0, criterion='l1'),
                 optim_kr=dict(type='Adam', lr=1e-3, betas=[0.9, 0.999]))
    extra.update(train_extra)
    opt = tiny_opt(tmp_path, model_type='MetaKDModel', **extra)
    opt['network_kr'] = dict(type='KRNet', width=8, num_kernels=4, kernel_size=3, corr_radius=1, hidden=8,
                             fitnet_branch=False)  # the texture representation alone
    opt['meta'] = {**dict(every=1, mode='exact', update='meta', objective='one_step', fd_eps=0.01),
                   **(meta or {})}
    return opt


def cpu_data_parallel(net):
    """An ``nn.DataParallel`` around a CPU module on any machine.

    With GPUs present, ``nn.DataParallel(net)`` insists on the module living on ``cuda:0``;
    without device ids it simply calls the module, which is what these wrapper tests need.
    """
    from torch import nn
    dp = nn.DataParallel.__new__(nn.DataParallel)
    nn.Module.__init__(dp)
    dp.module = net
    dp.device_ids = []
    dp.output_device = None
    dp.src_device_obj = torch.device('cpu')
    return dp


def central_differences(params, fn, h: float = 1e-6) -> torch.Tensor:
    """Central finite differences of the scalar ``fn()`` over every entry of ``params`` (perturbed
    in place, outside autograd), flattened in order."""
    numeric = []
    for p in params:
        flat_p = p.data.view(-1)
        for i in range(flat_p.numel()):
            old = flat_p[i].item()
            flat_p[i] = old + h
            lp = fn()
            flat_p[i] = old - h
            lm = fn()
            flat_p[i] = old
            numeric.append((lp - lm) / (2 * h))
    return torch.stack(numeric)


def stub_cuda(monkeypatch) -> None:
    """BasicSR's Real-ESRGAN models call ``.cuda()`` (GPU only): for the calling test alone, ``.cuda()``
    returns its object unchanged and BasicSR's ``filter2D`` gets contiguous tensors (its ``.view``
    refuses a non-contiguous CPU tensor), so the degradations and both steps run on the CPU."""
    from basicsr.models import realesrgan_model, realesrnet_model
    from basicsr.utils.img_process_util import filter2D
    monkeypatch.setattr(torch.nn.Module, 'cuda', lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)
    for module in (realesrgan_model, realesrnet_model):
        monkeypatch.setattr(module, 'filter2D', lambda img, kernel: filter2D(img.contiguous(), kernel))
