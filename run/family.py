"""The family a run builds when the user did not say: ``--resume`` without ``--model`` takes the checkpoint's.

Part of parsing (``main.parse_args``): it completes the Namespace before anything reads it.
"""

from __future__ import annotations

import argparse
import logging

from cli.arguments import apply_family_defaults
from cli.config import explicit_of, is_explicit
from run.checkpoint import find_resume_checkpoint, load_checkpoint
from run.model_loading import checkpoint_family

__all__ = ["adopt_checkpoint_family"]

log = logging.getLogger("detr")


def adopt_checkpoint_family(args: argparse.Namespace) -> argparse.Namespace:
    """Without an explicit ``--model``, a run with ``--resume`` builds the checkpoint's family (in place).

    Flags the user did not give then take that family's published defaults (``apply_family_defaults``); flags
    given on the command line or in ``--config`` keep their values. ``--resume auto`` reads the checkpoint it
    will continue from; no checkpoint (or ``--model`` given) leaves ``args`` unchanged.
    """
    if is_explicit(args, "model") or not args.resume:
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
        apply_family_defaults(args, explicit_of(args))
    return args
