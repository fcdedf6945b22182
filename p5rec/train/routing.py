"""Which task family's capacity a model call uses: the routing half of the family adapters
(:class:`p5rec.train.model.FamilyAdapters`), kept free of transformers so that scoring and serving code can import
it cheaply."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)
_WARNED: set[tuple[int, str]] = set()


@contextlib.contextmanager
def family_route(model, family: str):
    """Run ``model`` (possibly wrapped) as ``family`` for every call inside the block: its adapters, if it has
    any, are that family's. A family the model has no adapter for runs the shared model alone. A model without
    adapters is unaffected."""
    model = getattr(model, "module", model)
    names = getattr(model, "family_names", None)
    if not names:
        yield
        return
    index = names.index(family) if family in names else -1
    if index < 0 and (id(model), family) not in _WARNED:
        _WARNED.add((id(model), family))
        logger.warning("the model has no adapter for family %r (it has %s): the shared model alone answers",
                       family, ", ".join(names))
    before, model._route = model._route, torch.tensor([index])
    try:
        yield
    finally:
        model._route = before
