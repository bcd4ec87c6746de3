"""Model shapes of the families users bring: the Hub id and the config.json fields of each (the
``plan`` command builds the shape from them; pipelines name the model by its Hub id).
"""

import importlib
import pkgutil


def config_json(hub: str) -> dict | None:
    """The ``config.json`` fields of the model whose Hub id is ``hub`` (None: not here)."""
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if getattr(module, "HUB", None) == hub:
            return dict(module.get_config().config_json)
    return None
