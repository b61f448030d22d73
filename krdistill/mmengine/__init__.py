"""krdistill for mmengine: MetaKD inside ``mmengine.runner.Runner``.

Load it from a config with ``custom_imports = dict(imports=['krdistill.mmengine'])``. Importing
it (1) makes mmengine 0.10.7's checkpoint loading work under torch >= 2.6 (see
:mod:`krdistill.mmengine.compat`) and (2) registers in mmengine's root registries:

=============================  ================================================================
``MODELS``                     ``MMEngineMetaKDModel`` (teacher + student + KRNets + meta update),
                               ``KRNet``, ``TextureWiseLoss``, the SR-KD baselines
                               ``SROutputKDLoss``, ``SRFitNetLoss``, ``SRATLoss``, ``SRFAKDLoss``
                               (prefixed: MMRazor has an unrelated ``ATLoss``), and the toy
                               network ``MetaKDTinyEDSR``
``OPTIM_WRAPPER_CONSTRUCTORS`` ``MetaKDOptimWrapperConstructor`` (student + KRNet optimizers)
``DATASETS``                   ``SyntheticSRDataset`` (tiny synthetic pairs for smoke runs)
=============================  ================================================================

A name already registered by another package with a different class is an error (never
silently replaced). Train a config: ``python -m krdistill.mmengine.train CONFIG``.
"""
from __future__ import annotations

from . import compat

compat.apply()

from mmengine.registry import DATASETS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402

from ..archs.krnet_arch import KRNet  # noqa: E402
from ..losses.kd_loss import ATLoss, FAKDLoss, FitNetLoss, OutputKDLoss  # noqa: E402
from ..losses.texture_loss import TextureWiseLoss  # noqa: E402
from .data import SyntheticSRDataset  # noqa: E402
from .model import MetaKDOptimWrapperConstructor, MMEngineMetaKDModel  # noqa: E402
from .nets import TinyEDSR  # noqa: E402

__all__ = ['MMEngineMetaKDModel', 'MetaKDOptimWrapperConstructor', 'SyntheticSRDataset', 'TinyEDSR', 'REGISTERED']


def _register(registry, cls, name: str | None = None) -> None:
    name = name or cls.__name__
    existing = registry.module_dict.get(name)
    if existing is cls:
        return
    if existing is not None:
        raise KeyError(f'mmengine {registry.name} registry already holds a different {name!r} '
                       f'({existing.__module__}); krdistill will not replace it')
    registry.register_module(name=name, module=cls)


#: (registry name, registered name, class)
REGISTERED = [
    ('model', 'MMEngineMetaKDModel', MMEngineMetaKDModel),
    ('model', 'KRNet', KRNet),
    ('model', 'TextureWiseLoss', TextureWiseLoss),
    ('model', 'SROutputKDLoss', OutputKDLoss),
    ('model', 'SRFitNetLoss', FitNetLoss),
    ('model', 'SRATLoss', ATLoss),
    ('model', 'SRFAKDLoss', FAKDLoss),
    ('model', 'MetaKDTinyEDSR', TinyEDSR),
    ('optim_wrapper_constructor', 'MetaKDOptimWrapperConstructor', MetaKDOptimWrapperConstructor),
    ('dataset', 'SyntheticSRDataset', SyntheticSRDataset),
]
_REGISTRIES = {'model': MODELS, 'optim_wrapper_constructor': OPTIM_WRAPPER_CONSTRUCTORS, 'dataset': DATASETS}
for _reg, _name, _cls in REGISTERED:
    _register(_REGISTRIES[_reg], _cls, _name)
