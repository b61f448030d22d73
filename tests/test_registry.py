"""Importing krdistill registers each class exactly once, and nothing else runs at import."""
import importlib
import subprocess
import sys

import krdistill
from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

from krdistill.losses import kd_loss
from krdistill.models import kd_model


def test_classes_registered_once_and_are_ours():
    assert MODEL_REGISTRY.get('KDSRModel') is kd_model.KDSRModel
    for name in ('OutputKDLoss', 'FitNetLoss', 'ATLoss', 'FAKDLoss'):
        assert LOSS_REGISTRY.get(name) is getattr(kd_loss, name)
    # pure functions are not registered as losses
    assert 'fitnet_loss' not in LOSS_REGISTRY


def test_import_twice_is_harmless():
    importlib.reload(krdistill.compat)
    krdistill.compat.apply()
    importlib.import_module('krdistill.archs')
    assert MODEL_REGISTRY.get('KDSRModel') is kd_model.KDSRModel


def test_register_refuses_a_different_class_with_the_same_name():
    from torch import nn
    from krdistill.registry import register

    class EDSR(nn.Module):  # clashes with basicsr's EDSR
        pass
    try:
        register(ARCH_REGISTRY, EDSR)
    except KeyError as e:
        assert 'EDSR' in str(e)
    else:
        raise AssertionError('a clashing registration must fail')


def test_import_in_fresh_process_has_no_side_effects(tmp_path):
    code = ('import os, krdistill, torch; '
            'print(sorted(os.listdir("."))); print(torch.cuda.is_initialized())')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == '[]'  # nothing written to the working folder
    assert lines[-1] == 'False'  # CUDA untouched
