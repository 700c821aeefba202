"""Which detector family (``--model``) a checkpoint holds, and adopting it when the user did not say.

Checkpoints of this project store every flag, ``model`` included. Published files store an argparse.Namespace
without ``model`` (DETR, Deformable DETR) or with DINO's ``modelname``; their state-dict keys decide then.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from typing import Any

from cli.arguments import FAMILY_DEFAULTS, apply_family_defaults
from cli.config import EXPLICIT_ATTR, is_explicit
from run.checkpoint import find_resume_checkpoint, load_checkpoint

__all__ = ["adopt_checkpoint_family", "checkpoint_family"]

log = logging.getLogger("detr")


def checkpoint_family(checkpoint: Mapping[str, Any]) -> str:
    """The ``--model`` of a checkpoint: its stored args, else what its state-dict keys imply ('detr' by default)."""
    stored = checkpoint.get("args")
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else (stored or {})
    for key in ("model", "modelname"):  # modelname: the published DINO code's flag
        if stored.get(key) in FAMILY_DEFAULTS:
            return stored[key]
    state = checkpoint.get("model")
    keys = state.keys() if isinstance(state, Mapping) else ()
    prefix = "detr." if any(k.startswith("detr.") for k in keys) else ""
    if f"{prefix}transformer.level_embed" in keys:  # multi-scale deformable families
        # DINO's denoising label embedding and decoder query embedding have no Deformable DETR counterpart.
        dino = f"{prefix}label_enc.weight" in keys or f"{prefix}transformer.tgt_embed.weight" in keys
        return "dino" if dino else "deformable_detr"
    return "detr"


def adopt_checkpoint_family(args: argparse.Namespace) -> argparse.Namespace:
    """Without an explicit ``--model``, a run with ``--resume`` builds the checkpoint's family (in place).

    Flags the user did not give then take that family's published defaults (``apply_family_defaults``); flags
    given on the command line or in ``--config`` keep their values. ``--resume auto`` reads the checkpoint it
    will continue from; no checkpoint (or ``--model`` given) leaves ``args`` unchanged.
    """
    if is_explicit(args, "model") or not getattr(args, "resume", ""):
        return args
    source = args.resume
    if source == "auto":
        found = find_resume_checkpoint(args.output_dir) if args.output_dir else None
        if found is None:
            return args
        source = str(found)
    family = checkpoint_family(load_checkpoint(source, hint="check the --resume path"))
    if family != args.model:
        log.info("--model %s: the family of %s (pass --model to build another one)", family, source)
        args.model = family
        apply_family_defaults(args, getattr(args, EXPLICIT_ATTR, frozenset()))
    return args
