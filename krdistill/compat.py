"""The one place for upstream version shims (BasicSR 1.4.2, torchvision, torch >= 2.6).

``apply()`` is called by ``krdistill/__init__.py`` before anything imports basicsr.
Each shim is idempotent and only acts when the upstream problem is present.

Shims:
1. torchvision >= 0.17 renamed ``transforms.functional_tensor`` to ``_functional_tensor``;
   basicsr 1.4.2 imports the old name at import time. We alias the module.
2. ``basicsr.train.load_resume_state`` calls ``torch.cuda.current_device()``
   unconditionally and maps every tensor to CUDA; it cannot resume on a CPU machine. We
   replace it with a device-agnostic version (CUDA when the options ask for GPUs and one is
   present, CPU otherwise). Resume states are written by this training run itself (they hold
   a ``collections.Counter`` for MultiStepRestartLR, which ``weights_only`` refuses), so
   they are loaded with ``weights_only=False``.
3. ``basicsr.utils.misc.check_resume`` points every ``network_*`` at
   ``models/net_<x>_<iter>.pth`` on resume. A teacher is never saved, so ``network_t`` is
   always treated as listed in ``path.ignore_resume_networks``.
4. BasicSR's image datasets fail on an unreadable image with ``'NoneType' object has no
   attribute 'astype'``. Their ``__getitem__`` is wrapped to re-raise with the file, the
   dataset name and the option key (``datasets.<phase>.dataroot_*``).
5. ``basicsr.train.create_train_val_dataloader`` rejects dataset phases other than train/val.
   MetaKD's optional ``datasets.meta`` is built by the model itself, so it is hidden from
   that function. The wrapper also runs :func:`krdistill.preflight.check_datasets` first
   (missing, empty, mismatched or corrupt image folders fail before anything is built), and
   on resume makes the train sampler skip the batches of the resumed epoch that were trained
   on before the checkpoint (BasicSR restarts that epoch from its first batch; see
   ``krdistill/resume.py``, which also explains the random states the models save).
6. ``basicsr.utils.dist_util._init_dist_pytorch`` calls ``torch.cuda.set_device`` and uses
   NCCL; on a machine without CUDA (CPU runs under ``torchrun``, tests) it uses the gloo
   backend and skips the device selection instead.
"""
from __future__ import annotations

import importlib
import os
import sys

_APPLIED = False


def _alias_functional_tensor() -> None:
    # One implementation, shared with the interpreter-start hook that ships beside the package.
    from _krdistill_autoload import alias_functional_tensor
    alias_functional_tensor()


def resume_map_location(opt: dict):
    """Where to put tensors of a resume state: CUDA if asked for and present, else CPU."""
    import torch
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def check_resume(opt: dict, resume_iter: int) -> None:
    """``basicsr.utils.misc.check_resume`` that never redirects the teacher (``network_t``)."""
    from basicsr.utils import misc
    ignore = list(opt['path'].get('ignore_resume_networks') or [])
    if 'network_t' in opt and 'network_t' not in ignore:
        ignore.append('network_t')
        opt['path']['ignore_resume_networks'] = ignore
    misc._krdistill_orig_check_resume(opt, resume_iter)


def load_resume_state(opt: dict):
    """Device-agnostic replacement of ``basicsr.train.load_resume_state``."""
    import torch
    from basicsr.utils import scandir
    from os import path as osp

    resume_state_path = None
    if opt['auto_resume']:
        state_path = osp.join(opt.get('root_path', '.'), 'experiments', opt['name'], 'training_states')
        if osp.isdir(state_path):
            states = [v for v in scandir(state_path, suffix='state', recursive=False, full_path=False)]
            iters = []
            for v in states:
                try:
                    iters.append(int(float(v.split('.state')[0])))
                except ValueError:  # e.g. a temporary file left by a killed save
                    continue
            if iters:
                resume_state_path = osp.join(state_path, f'{max(iters)}.state')
                opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']

    if resume_state_path is None:
        return None
    if not osp.isfile(resume_state_path):
        raise FileNotFoundError(f'path.resume_state: no such file: {resume_state_path}')
    resume_state = torch.load(resume_state_path, map_location=resume_map_location(opt), weights_only=False)
    check_resume(opt, resume_state['iter'])
    # where the data stream stopped: the train loader built next skips what that epoch already used
    opt['resume_point'] = {'epoch': int(resume_state['epoch']), 'iter': int(resume_state['iter'])}
    return resume_state


def _wrap_getitem(cls) -> None:
    if getattr(cls.__getitem__, '_krdistill_wrapped', False):
        return
    orig = cls.__getitem__

    def __getitem__(self, index):
        try:
            return orig(self, index)
        except Exception as e:  # noqa: BLE001  (re-raised with context)
            opt = getattr(self, 'opt', {}) or {}
            phase = opt.get('phase', '?')
            paths = getattr(self, 'paths', None)
            where = paths[index] if isinstance(paths, list) and 0 <= index < len(paths) else f'index {index}'
            raise RuntimeError(f'datasets.{phase} ({opt.get("name")}): cannot read sample {where} '
                               f'(check datasets.{phase}.dataroot_gt / dataroot_lq; is the file a valid image?): '
                               f'{type(e).__name__}: {e}') from e

    __getitem__._krdistill_wrapped = True
    cls.__getitem__ = __getitem__


MODEL_DATASET_PHASES = ('meta',)


def _hide_model_datasets(func):
    """Hide dataset phases that a model builds itself (``datasets.meta``) from BasicSR's loader builder."""

    def create_train_val_dataloader(opt, logger):
        from .preflight import check_datasets
        check_datasets(opt)  # clear errors before anything is built (see krdistill/preflight.py)
        hidden = {k: opt['datasets'].pop(k) for k in list(opt['datasets']) if k.split('_')[0] in MODEL_DATASET_PHASES}
        try:
            result = func(opt, logger)
        finally:
            opt['datasets'].update(hidden)
        point = opt.get('resume_point')
        train_loader, train_sampler = result[0], result[1]
        if point and train_loader is not None and train_sampler is not None:
            from .resume import skip_consumed_batches
            n = skip_consumed_batches(train_loader, point['epoch'], point['iter'],
                                      opt['datasets']['train']['batch_size_per_gpu'])
            if n:
                logger.info(f'Resuming mid-epoch: epoch {point["epoch"]} continues after the {n} of its '
                            f'{len(train_loader)} batches trained on before iter {point["iter"]}.')
        return result

    create_train_val_dataloader._krdistill_wrapped = True
    return create_train_val_dataloader


def _init_dist_pytorch(backend='nccl', **kwargs):
    """``--launcher pytorch`` that also works without CUDA (gloo on CPU)."""
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(os.environ['RANK']) % torch.cuda.device_count())
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def _patch_basicsr() -> None:
    from basicsr.utils import dist_util
    dist_util._init_dist_pytorch = _init_dist_pytorch
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from basicsr.data.single_image_dataset import SingleImageDataset
    for cls in (PairedImageDataset, SingleImageDataset):
        _wrap_getitem(cls)
    from basicsr.utils import misc
    import basicsr.utils
    if not hasattr(misc, '_krdistill_orig_check_resume'):
        misc._krdistill_orig_check_resume = misc.check_resume
        misc.check_resume = check_resume
        basicsr.utils.check_resume = check_resume
    train_mod = importlib.import_module('basicsr.train')
    if not getattr(train_mod.create_train_val_dataloader, '_krdistill_wrapped', False):
        train_mod.create_train_val_dataloader = _hide_model_datasets(train_mod.create_train_val_dataloader)
    if getattr(train_mod.load_resume_state, '__module__', '') != __name__:
        train_mod.load_resume_state = load_resume_state
        train_mod.check_resume = check_resume


def apply() -> None:
    """Apply every shim once. Safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _alias_functional_tensor()
    try:
        importlib.import_module('basicsr')
    except ImportError:
        _APPLIED = True  # framework-free use: nothing to patch
        return
    _patch_basicsr()
    _APPLIED = True
