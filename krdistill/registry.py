"""Registration of krdistill classes in BasicSR's registries (the only BasicSR coupling of archs/losses)."""
from __future__ import annotations


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
