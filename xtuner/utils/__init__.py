"""Constants and chat templates that configs import from ``xtuner.utils``.

Each name is imported on first use (:mod:`xtuner._lazy`), so ``xtuner.utils.constants``
does not import mmengine (which the templates need): add a name with one line below.
"""

from xtuner._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "IGNORE_INDEX": ".constants",
        "DEFAULT_PAD_TOKEN_INDEX": ".constants",
        "IMAGE_TOKEN_INDEX": ".constants",
        "DEFAULT_IMAGE_TOKEN": ".constants",
        "PROMPT_TEMPLATE": ".templates",
        "SYSTEM_TEMPLATE": ".templates",
        "get_template": ".templates",
    },
)
