"""Reading a detector's architecture from its state-dict keys: helpers shared by the families' checkpoint code."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

__all__ = ["count_layers", "key_prefix"]

# DETRsegm (the mask-head wrapper) keeps its detector under this key prefix.
_WRAPPED = "detr."


def key_prefix(state: Mapping[str, Tensor]) -> str:
    """'detr.' when the detector's keys sit under the segmentation wrapper's ``detr.``, else ''."""
    return _WRAPPED if any(k.startswith(_WRAPPED) for k in state) else ""


def count_layers(state: Mapping[str, Tensor], stack: str, prefix: str = "") -> int:
    """Layers of ``{prefix}transformer.{stack}.layers.{i}.*`` (stack 'encoder' or 'decoder')."""
    head = f"{prefix}transformer.{stack}.layers."
    return len({k[len(head) :].split(".")[0] for k in state if k.startswith(head)})
