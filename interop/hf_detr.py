"""HF transformers DETR / Deformable DETR weights <-> this project's state dicts (published key layout).

The HF names are those of the published HF hub checkpoints (``facebook/detr-resnet-50``,
``SenseTime/deformable-detr*``), which transformers 5.x still writes in ``save_pretrained`` and renames on load.
The backbone is HF's timm ResNet (``use_timm_backbone``): timm's ResNet tensors carry torchvision's names, under
``model.backbone.conv_encoder.model.`` instead of ``backbone.0.body.``. What the mapping bridges:

- attention: HF's separate q/k/v projections <-> one fused ``in_proj_weight`` / ``in_proj_bias`` (rows q, k, v);
- names: ``fc1``/``fc2`` <-> ``linear1``/``linear2``; HF's per-sub-layer norms <-> ``norm1..3`` (DETR's decoder
  normalises self-attention first, Deformable DETR's cross-attention first); ``query_position_embeddings`` <->
  ``query_embed`` (Deformable DETR: [Q, 2D], query position then content, in both);
- Deformable DETR's per-layer heads: HF 5.x ties heads that start out equal and saves one copy (``class_embed.0``,
  or ``model.decoder.*`` for refined / two-stage heads); the missing names are filled from the saved copy.

Every tensor is accounted for: a key left over on either side raises `MappingError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Arch", "MappingError", "hf_to_project_state", "key_links", "project_arch", "project_to_hf_state"]

#: Backbone prefixes: ours (published) and HF's timm backbone.
OUR_BODY, HF_BODY = "backbone.0.body.", "model.backbone.conv_encoder.model."

# Per-layer module names, ours -> HF (weight and bias each). Attention inputs are fused in ours (see _FUSED_*).
_DETR_ENCODER = {
    "self_attn.out_proj": "self_attn.out_proj", "linear1": "fc1", "linear2": "fc2",
    "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm",
}  # fmt: skip
_DETR_DECODER = {
    "self_attn.out_proj": "self_attn.out_proj", "multihead_attn.out_proj": "encoder_attn.out_proj",
    "linear1": "fc1", "linear2": "fc2", "norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm",
    "norm3": "final_layer_norm",
}  # fmt: skip
_DEFORMABLE_ATTN = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
_DEFORMABLE_ENCODER = {
    **{f"self_attn.{m}": f"self_attn.{m}" for m in _DEFORMABLE_ATTN},
    "norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2", "norm2": "final_layer_norm",
}  # fmt: skip
_DEFORMABLE_DECODER = {
    **{f"cross_attn.{m}": f"encoder_attn.{m}" for m in _DEFORMABLE_ATTN},
    "norm1": "encoder_attn_layer_norm", "self_attn.out_proj": "self_attn.out_proj", "norm2": "self_attn_layer_norm",
    "linear1": "fc1", "linear2": "fc2", "norm3": "final_layer_norm",
}  # fmt: skip
_FUSED_ENCODER = {"self_attn": "self_attn"}
_FUSED_DETR_DECODER = {"self_attn": "self_attn", "multihead_attn": "encoder_attn"}
_FUSED_DEFORMABLE_DECODER = {"self_attn": "self_attn"}
_MASK_HEAD = [
    "bbox_attention.q_linear", "bbox_attention.k_linear", *(f"mask_head.lay{i}" for i in range(1, 6)),
    *(f"mask_head.gn{i}" for i in range(1, 6)), "mask_head.out_lay", *(f"mask_head.adapter{i}" for i in range(1, 4)),
]  # fmt: skip
_TWO_STAGE = ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")

# Other spellings of the same HF tensors -> the hub layout: transformers 5.x in-memory names, and 4.x's place of
# the learned position embedding.
_HF_ALIASES = (
    ("model.backbone.model.", HF_BODY),
    ("model.backbone.position_embedding.", "model.position_embedding."),
    (".self_attn.o_proj.", ".self_attn.out_proj."),
    (".encoder_attn.o_proj.", ".encoder_attn.out_proj."),
    (".mlp.fc1.", ".fc1."),
    (".mlp.fc2.", ".fc2."),
)

Link = tuple[str, tuple[str, ...]]


class MappingError(ValueError):
    """Weights that do not map one-to-one between the two layouts."""


@dataclass(frozen=True)
class Arch:
    """What decides the key layout of a model (the same for both sides).

    Attributes:
        family: 'detr' or 'deformable_detr'.
        enc_layers / dec_layers: transformer depth.
        masks: DETR with the panoptic mask head (ours: ``detr.`` prefix; HF: ``DetrForSegmentation``).
        learned_pos: learned (not sine) position embedding.
        num_feature_levels / with_box_refine / two_stage: Deformable DETR's variant.
    """

    family: str
    enc_layers: int
    dec_layers: int
    masks: bool = False
    learned_pos: bool = False
    num_feature_levels: int = 1
    with_box_refine: bool = False
    two_stage: bool = False

    @property
    def num_heads(self) -> int:
        """Deformable DETR's per-layer class / box heads (one more for two-stage proposals)."""
        return self.dec_layers + int(self.two_stage)


def _wb(ours: str, hf: str) -> Iterator[Link]:
    yield f"{ours}.weight", (f"{hf}.weight",)
    yield f"{ours}.bias", (f"{hf}.bias",)


def _layers(ours: str, hf: str, count: int, modules: Mapping[str, str], fused: Mapping[str, str]) -> Iterator[Link]:
    for i in range(count):
        for o, h in modules.items():
            yield from _wb(f"{ours}.{i}.{o}", f"{hf}.{i}.{h}")
        for o, h in fused.items():
            for kind in ("weight", "bias"):
                yield f"{ours}.{i}.{o}.in_proj_{kind}", tuple(f"{hf}.{i}.{h}.{x}_proj.{kind}" for x in "qkv")


def _mlp(ours: str, hf: str) -> Iterator[Link]:
    for j in range(3):
        yield from _wb(f"{ours}.layers.{j}", f"{hf}.layers.{j}")


def key_links(arch: Arch) -> list[Link]:
    """(our key, HF keys) for every tensor outside the ResNet body; several HF keys are our key's rows in order."""
    if arch.family == "detr":
        return list(_detr_links(arch))
    if arch.family == "deformable_detr":
        return list(_deformable_links(arch))
    raise MappingError(f"--model {arch.family}: HF transformers has no such model; convert detr or deformable_detr")


def _position_links(ours: str, hf: str) -> Iterator[Link]:
    yield f"{ours}backbone.1.row_embed.weight", (f"{hf}model.position_embedding.row_embeddings.weight",)
    yield f"{ours}backbone.1.col_embed.weight", (f"{hf}model.position_embedding.column_embeddings.weight",)


def _detr_links(arch: Arch) -> Iterator[Link]:
    o, h = ("detr.", "detr.") if arch.masks else ("", "")
    yield from _layers(f"{o}transformer.encoder.layers", f"{h}model.encoder.layers", arch.enc_layers,
                       _DETR_ENCODER, _FUSED_ENCODER)  # fmt: skip
    yield from _layers(f"{o}transformer.decoder.layers", f"{h}model.decoder.layers", arch.dec_layers,
                       _DETR_DECODER, _FUSED_DETR_DECODER)  # fmt: skip
    yield from _wb(f"{o}transformer.decoder.norm", f"{h}model.decoder.layernorm")
    yield from _wb(f"{o}input_proj", f"{h}model.input_projection")
    yield f"{o}query_embed.weight", (f"{h}model.query_position_embeddings.weight",)
    yield from _wb(f"{o}class_embed", f"{h}class_labels_classifier")
    yield from _mlp(f"{o}bbox_embed", f"{h}bbox_predictor")
    if arch.learned_pos:
        yield from _position_links(o, h)
    if arch.masks:
        for name in _MASK_HEAD:
            yield from _wb(name, name)


def _deformable_links(arch: Arch) -> Iterator[Link]:
    if arch.masks:
        raise MappingError("Deformable DETR with --masks: HF transformers has no Deformable DETR segmentation model")
    yield from _layers("transformer.encoder.layers", "model.encoder.layers", arch.enc_layers,
                       _DEFORMABLE_ENCODER, {})  # fmt: skip
    yield from _layers("transformer.decoder.layers", "model.decoder.layers", arch.dec_layers,
                       _DEFORMABLE_DECODER, _FUSED_DEFORMABLE_DECODER)  # fmt: skip
    yield "transformer.level_embed", ("model.level_embed",)
    for level in range(arch.num_feature_levels):
        for j in range(2):  # conv, GroupNorm
            yield from _wb(f"input_proj.{level}.{j}", f"model.input_proj.{level}.{j}")
    if arch.two_stage:
        for name in _TWO_STAGE:
            yield from _wb(f"transformer.{name}", f"model.{name}")
    else:
        yield "query_embed.weight", ("model.query_position_embeddings.weight",)
        yield from _wb("transformer.reference_points", "model.reference_points")
    for i in range(arch.num_heads):
        yield from _wb(f"class_embed.{i}", f"class_embed.{i}")
        yield from _mlp(f"bbox_embed.{i}", f"bbox_embed.{i}")
        if arch.with_box_refine:
            yield from _mlp(f"transformer.decoder.bbox_embed.{i}", f"model.decoder.bbox_embed.{i}")
        if arch.two_stage:
            yield from _wb(f"transformer.decoder.class_embed.{i}", f"model.decoder.class_embed.{i}")
    if arch.learned_pos:
        yield from _position_links("", "")


def _body_prefixes(arch: Arch) -> tuple[str, str]:
    return ("detr." + OUR_BODY, "detr." + HF_BODY) if arch.masks else (OUR_BODY, HF_BODY)


def _listed(keys: list[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------------------ HF -> ours


def _canonical_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors under their hub names (other spellings renamed)."""
    out = {}
    for key, value in state.items():
        for old, new in _HF_ALIASES:
            key = key.replace(old, new)
        out[key] = value
    return out


def _tied_source(key: str, arch: Arch, state: Mapping[str, Tensor]) -> str | None:
    """The saved HF tensor that an absent Deformable DETR head tensor is tied to (None: not a tied head)."""
    for head in ("class_embed.", "bbox_embed."):
        for side in ("", "model.decoder."):
            if not key.startswith(side + head):
                continue
            index, _, rest = key[len(side + head) :].partition(".")
            other = "model.decoder." if side == "" else ""
            candidates = [f"{other}{head}{index}.{rest}", f"{side}{head}0.{rest}", f"{other}{head}0.{rest}"]
            return next((c for c in candidates if c in state), None)
    return None


def _complete_tied_heads(state: dict[str, Tensor], arch: Arch, needed: list[str]) -> None:
    """Fill Deformable DETR head tensors HF did not save because they are tied to a saved one (in place)."""
    for key in needed:
        if key not in state and (source := _tied_source(key, arch, state)) is not None:
            state[key] = state[source]


def _check_shared_heads(state: Mapping[str, Tensor], arch: Arch) -> None:
    """Without box refinement our per-layer heads are one module: HF's copies must agree."""
    if arch.family != "deformable_detr" or arch.with_box_refine:
        return
    for key in state:
        if key.startswith(("class_embed.", "bbox_embed.")) and not key.split(".")[1] == "0":
            first = key.split(".", 2)
            reference = f"{first[0]}.0.{first[2]}"
            if reference in state and not torch.equal(state[key], state[reference]):
                raise MappingError(
                    f"HF {key} differs from {reference}, but without with_box_refine Deformable DETR shares one "
                    "head across decoder layers; convert it with with_box_refine or re-save it with equal heads"
                )


def hf_to_project_state(hf_state: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """HF weights (hub names) -> our state dict (published names).

    Raises:
        MappingError: an expected HF tensor is missing, or an HF tensor has no place in our model.
    """
    hf = _canonical_hf(hf_state)
    links = key_links(arch)
    _complete_tied_heads(hf, arch, [k for _, sources in links for k in sources])
    _check_shared_heads(hf, arch)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    missing = [k for _, sources in links for k in sources if k not in hf]
    if missing:
        raise MappingError(f"HF weights lack {_listed(missing)} (expected for {arch})")
    for ours, sources in links:
        state[ours] = torch.cat([hf[k] for k in sources]) if len(sources) > 1 else hf[sources[0]]
        used.update(sources)
    ours_body, hf_body = _body_prefixes(arch)
    for key, value in hf.items():
        if key.startswith(hf_body):
            used.add(key)
            if not key.endswith(".num_batches_tracked"):  # HF's frozen BN drops them on load; ours has none
                state[ours_body + key[len(hf_body) :]] = value
    if not any(k.startswith(ours_body) for k in state):
        raise MappingError(f"HF weights have no timm ResNet backbone under {hf_body}")
    leftover = sorted(set(hf) - used)
    if leftover:
        raise MappingError(f"HF weights not mapped to this project's {arch.family}: {_listed(leftover)}")
    return state


# ------------------------------------------------------------------------------------------ ours -> HF


def project_to_hf_state(state: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """Our state dict (published names) -> HF weights (hub names), each tensor its own contiguous copy.

    Raises:
        MappingError: an expected tensor is missing, or one of ours has no HF counterpart.
    """
    links = key_links(arch)
    missing = [ours for ours, _ in links if ours not in state]
    if missing:
        raise MappingError(f"checkpoint lacks {_listed(missing)} (expected for {arch})")
    hf: dict[str, Tensor] = {}
    used: set[str] = set()
    for ours, sources in links:
        value = state[ours]
        if len(sources) > 1:
            if value.shape[0] % len(sources):
                raise MappingError(f"{ours}: {value.shape[0]} rows do not split into {len(sources)} projections")
            for key, part in zip(sources, value.chunk(len(sources))):
                hf[key] = part.clone().contiguous()
        else:
            hf[sources[0]] = value.clone().contiguous()
        used.add(ours)
    ours_body, hf_body = _body_prefixes(arch)
    for key, value in state.items():
        if key.startswith(ours_body):
            used.add(key)
            if not key.endswith(".num_batches_tracked"):
                hf[hf_body + key[len(ours_body) :]] = value.clone().contiguous()
    leftover = sorted(set(state) - used)
    if leftover:
        raise MappingError(f"checkpoint tensors with no HF counterpart: {_listed(leftover)}")
    return hf


# ------------------------------------------------------------------------------------------ architecture


def _count(state: Mapping[str, Tensor], head: str) -> int:
    return len({k[len(head) :].split(".")[0] for k in state if k.startswith(head)})


def project_arch(state: Mapping[str, Tensor], family: str) -> Arch:
    """The `Arch` of one of our state dicts (``family``: its ``--model``)."""
    if family not in ("detr", "deformable_detr"):
        raise MappingError(f"--model {family}: HF transformers has no such model; convert detr or deformable_detr")
    masks = family == "detr" and any(k.startswith("detr.") for k in state)
    o = "detr." if masks else ""
    if family == "detr" and f"{o}transformer.encoder.norm.weight" in state:
        raise MappingError("--pre_norm DETR: HF's DetrModel is post-norm only (no encoder norm); cannot convert")
    return Arch(
        family=family,
        enc_layers=_count(state, f"{o}transformer.encoder.layers."),
        dec_layers=_count(state, f"{o}transformer.decoder.layers."),
        masks=masks,
        learned_pos=f"{o}backbone.1.row_embed.weight" in state,
        num_feature_levels=state["transformer.level_embed"].shape[0] if family != "detr" else 1,
        with_box_refine="transformer.decoder.bbox_embed.0.layers.0.weight" in state,
        two_stage="transformer.enc_output.weight" in state,
    )
