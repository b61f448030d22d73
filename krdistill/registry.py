"""Registration of krdistill classes in BasicSR's registries (the only BasicSR coupling of archs/losses)."""
from __future__ import annotations

import importlib
import inspect
import os
from os import path as osp


def register(registry, cls) -> None:
    """Register ``cls`` under its class name unless this very class is already there.

    BasicSR's registries are global across plug-ins; a different class under the same name is
    an error (never silently replaced).
    """
    name = cls.__name__
    if name in registry._obj_map:
        if registry._obj_map[name] is cls:
            return
        raise KeyError(f'{registry._name} already holds a different class named {name!r} '
                       f'({registry._obj_map[name].__module__}); krdistill will not replace it.')
    registry.register(cls)


def import_and_register(package: str, folder: str, suffix: str, registry_name: str) -> list:
    """Import every ``*<suffix>.py`` module of ``package`` and register the ``nn.Module`` classes in
    their ``__all__`` in ``basicsr.utils.registry.<registry_name>``.

    The modules themselves are torch-only. Without basicsr installed they are still imported
    (framework-free use) and nothing is registered; a broken basicsr install fails loudly.
    """
    from torch import nn
    try:
        import basicsr  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != 'basicsr':
            raise
        registry = None
    else:
        registry = getattr(importlib.import_module('basicsr.utils.registry'), registry_name)
    names = sorted(osp.splitext(e.name)[0] for e in os.scandir(folder) if e.is_file() and e.name.endswith(suffix))
    modules = [importlib.import_module(f'{package}.{n}') for n in names]
    if registry is not None:
        for m in modules:
            for name in getattr(m, '__all__', []):
                obj = getattr(m, name)
                if inspect.isclass(obj) and issubclass(obj, nn.Module):
                    register(registry, obj)
    return modules
