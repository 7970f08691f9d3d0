"""Registries: one per kind of component a config can name by string.

``BUILDER`` builds anything a config names (mmengine objects, HF classes, our own);
``MAP_FUNC`` holds dataset map functions; ``LOSSES`` holds loss modules; ``HEAD_ADAPTERS``
holds functions ``model -> OutputHead`` that tell the chunked losses how a model family makes
its logits (see :mod:`xtuner.model.losses.head`). Configs may give a class, a registered name,
or a dotted import path (``'my_pkg.losses.MyLoss'``).
"""

from mmengine.registry import Registry

__all__ = ["BUILDER", "MAP_FUNC", "LOSSES", "HEAD_ADAPTERS"]

BUILDER = Registry("builder")
MAP_FUNC = Registry("map_fn", locations=["xtuner.dataset.map_fns"])
LOSSES = Registry("loss", locations=["xtuner.model.losses"])
HEAD_ADAPTERS = Registry("head adapter", locations=["xtuner.model.losses.head"])
