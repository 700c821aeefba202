"""Reading a detector's architecture from its state-dict keys: helpers shared by the families' checkpoint code."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
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


def read_weights_file(path: str, expected: str, strip_prefixes: Sequence[str] = ("module.",)) -> dict[str, Tensor]:
    """A state dict from a local weights file (``--backbone_weights PATH``).

    The file may be .pth/.bin (a bare dict, ``{'model': ...}`` or ``{'state_dict': ...}``) or .safetensors. For each
    of ``strip_prefixes`` in order that some key has (e.g. a DDP ``module.`` or a detector's ``backbone.0.``), only
    the keys under it are kept, without it. ``expected`` completes the missing-file error ("expected 'none' or ...").
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--backbone_weights {path}: no such file; expected {expected}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"--backbone_weights {path}: expected a state dict, got {type(state).__name__}")
    for prefix in strip_prefixes:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
