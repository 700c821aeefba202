"""Fine-tuning start: load a checkpoint into a model whose heads differ (num_classes, num_queries).

Every checkpoint tensor whose name and shape match is copied; tensors whose shape differs are allowed only in
the heads that depend on the dataset or the query count (the family's ``head_prefixes``), and get their module's
own initialisation (``reset_parameters``), or keep the freshly built model's values (``keep_initial``: the
Deformable DETR / DINO class heads start at the focal-loss prior, which ``reset_parameters`` would lose).
Anything else that does not fit means the checkpoint comes from another architecture, which is an error
rather than a silent partial load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from models import FAMILIES, family_of_state_dict
from run.checkpoint import inference_weights, load_checkpoint

# A segmentation model (DETRsegm) wraps the detector under "detr."; these belong to its mask head only.
_SEGM_PREFIX = "detr."
_MASK_HEAD_PREFIXES = ("bbox_attention.", "mask_head.")

_ARCH_FLAGS = (
    "--model, --backbone, --hidden_dim, --dim_feedforward, --enc_layers, --dec_layers, --pre_norm, "
    "--position_embedding (Deformable DETR / DINO: --num_feature_levels, --with_box_refine, --two_stage)"
)


class FinetuneError(ValueError):
    """The checkpoint does not fit the model beyond its dataset-specific heads."""


def load_for_finetuning(
    model: nn.Module,
    path_or_url: str,
    reinit_prefixes: Sequence[str] | None = None,
    verbose: bool = True,
    keep_initial: bool = False,
    purpose: str = "fine-tuning from",
) -> list[str]:
    """Initialise ``model`` from a checkpoint for fine-tuning on another dataset.

    Args:
        model: the freshly built model (e.g. ``models.build_model(args)[0]``), DETR or DETRsegm.
        path_or_url: checkpoint file or https URL (``run.checkpoint.load_checkpoint``); a dict with a 'model'
            state dict, or a bare state dict. A detection checkpoint loads into a segmentation model (its
            keys gain the "detr." prefix) and a segmentation checkpoint into a detector (its mask head is
            skipped, with a message).
        reinit_prefixes: tensors allowed to differ in shape (after an optional "detr." prefix); None: the
            ``head_prefixes`` of the family whose ``owns_state_dict`` claims the model's state dict.
        verbose: print one summary line and one line per tensor that was not loaded.
        keep_initial: mismatched tensors keep the model's current (freshly built) values instead of being reset
            with ``reset_parameters``. Tensors a model lists under several names stay shared either way.
        purpose: how the summary line starts ('fine-tuning from'; torch.hub's loads say 'weights from').

    Returns:
        Names of the model's tensors that were NOT taken from the checkpoint, in state-dict order: those
        re-initialised because their shape differs, and those the checkpoint does not have.

    Raises:
        FinetuneError: the checkpoint has tensors the model lacks, or a shape differs outside the heads, or
            ``reinit_prefixes`` is None and no family claims the model.
    """
    checkpoint = load_checkpoint(path_or_url, hint="check the --finetune path")
    state = _model_state(checkpoint, path_or_url)
    model_state = model.state_dict()
    if reinit_prefixes is None:
        reinit_prefixes = _family_heads(model_state)
    state, skipped = _align_prefixes(state, model_state)

    unexpected = [k for k in state if k not in model_state]
    if unexpected:
        raise FinetuneError(
            f"{path_or_url}: {len(unexpected)} checkpoint tensors have no place in this model (e.g. "
            f"{', '.join(unexpected[:3])}); it comes from another architecture: match {_ARCH_FLAGS} and --masks"
        )
    mismatched = [k for k in state if state[k].shape != model_state[k].shape]
    allowed = tuple(reinit_prefixes) + tuple(_SEGM_PREFIX + p for p in reinit_prefixes)
    wrong = [k for k in mismatched if not k.startswith(allowed)]
    if wrong:
        details = "; ".join(f"{k} {list(state[k].shape)} vs {list(model_state[k].shape)}" for k in wrong[:3])
        raise FinetuneError(
            f"{path_or_url}: shapes differ outside the class/query heads ({details}); "
            f"the checkpoint comes from another architecture: match {_ARCH_FLAGS}"
        )

    if not keep_initial:
        _reset_owners(model, mismatched)
    loadable = {k: v for k, v in state.items() if k not in set(mismatched)}
    with torch.no_grad():
        model.load_state_dict(loadable, strict=False)

    not_loaded = [k for k in model_state if k not in loadable]
    if verbose:
        _report(path_or_url, state, model_state, not_loaded, mismatched, skipped, purpose)
    return not_loaded


def _family_heads(model_state: Mapping[str, Tensor]) -> tuple[str, ...]:
    """The ``head_prefixes`` of the family that owns ``model_state``."""
    try:
        return FAMILIES[family_of_state_dict(model_state)].head_prefixes
    except ValueError as error:
        raise FinetuneError(f"cannot tell the model's dataset-specific heads ({error}); pass reinit_prefixes") from None


def _model_state(checkpoint: Mapping, source: str) -> dict[str, Tensor]:
    state = inference_weights(checkpoint) or checkpoint  # EMA weights first (published RT-DETR files)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise FinetuneError(f"{source}: expected a checkpoint with a 'model' state dict (or a bare state dict)")
    return dict(state)


def _align_prefixes(state: dict[str, Tensor], model_state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Map detector keys onto a DETRsegm model and back; returns (state, number of mask-head tensors skipped)."""
    model_segm = any(k.startswith(_SEGM_PREFIX) for k in model_state)
    ckpt_segm = any(k.startswith(_SEGM_PREFIX) for k in state)
    if model_segm and not ckpt_segm:
        return {(k if k.startswith(_MASK_HEAD_PREFIXES) else _SEGM_PREFIX + k): v for k, v in state.items()}, 0
    if ckpt_segm and not model_segm:
        kept = {k[len(_SEGM_PREFIX) :]: v for k, v in state.items() if k.startswith(_SEGM_PREFIX)}
        return kept, len(state) - len(kept)
    return state, 0


def _reset_owners(model: nn.Module, names: Sequence[str]) -> None:
    """Re-initialise the modules owning ``names`` with their own ``reset_parameters``."""
    for owner in dict.fromkeys(name.rpartition(".")[0] for name in names):
        module = model.get_submodule(owner)
        resettable = [m for m in module.modules() if hasattr(m, "reset_parameters")]
        if not resettable:
            raise FinetuneError(f"cannot re-initialise '{owner}' ({type(module).__name__} has no reset_parameters)")
        for submodule in resettable:
            submodule.reset_parameters()


def _report(source, state, model_state, not_loaded, mismatched, skipped, purpose: str = "fine-tuning from") -> None:
    loaded = len(model_state) - len(not_loaded)
    print(f"{purpose} {source}: loaded {loaded}/{len(model_state)} tensors, {len(not_loaded)} not loaded")
    for name in not_loaded:
        if name in mismatched:
            shapes = f"checkpoint {list(state[name].shape)} -> model {list(model_state[name].shape)}"
            print(f"  re-initialised {name} ({shapes})")
        else:
            print(f"  kept the model's initial {name} (not in checkpoint)")
    if skipped:
        print(f"  ignored {skipped} mask-head tensors of the segmentation checkpoint")
