"""krdistill models (BasicSR MODEL_REGISTRY): every ``*_model.py`` here is imported for registration."""
import importlib
from os import path as osp

from basicsr.utils import scandir

_folder = osp.dirname(osp.abspath(__file__))
_names = sorted(osp.splitext(osp.basename(v))[0] for v in scandir(_folder) if v.endswith('_model.py'))
_modules = [importlib.import_module(f'krdistill.models.{n}') for n in _names]
