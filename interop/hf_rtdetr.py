"""HF transformers RT-DETRv2 weights <-> this project's RT-DETRv2 state dicts (published key layout).

The HF names are those ``RTDetrV2ForObjectDetection.save_pretrained`` writes (transformers 5.x; the hub layout):
transformers renames some on load (``o_proj``, ``mlp.fc1``, ``encoder.aifi``), and those spellings are accepted
too. Every tensor has one place; what the mapping bridges:

- names: HF's ResNet-vd backbone (``embedder.embedder.{0,1,2}``, ``stages.{s}.layers.{j}.layer.{0,1,2}``,
  ``shortcut`` / ``shortcut.1`` after the average pool, ``convolution`` / ``normalization``) <-> PResNet's
  (``conv1.conv1_{1,2,3}``, ``res_layers.{s}.blocks.{j}.branch2{a,b,c}``, ``short.conv`` / ``short.norm`` /
  ``short.conv.conv`` / ``short.conv.norm``); ``encoder_input_proj`` / ``decoder_input_proj`` Sequentials
  (``0`` conv, ``1`` BN) <-> ``input_proj.{l}.conv`` / ``.norm``; ``fc1``/``fc2`` <-> ``linear1``/``linear2``;
  HF's per-sub-layer norms <-> ``norm1..3``; ``encoder_attn`` <-> ``cross_attn`` (``n_points_scale`` <->
  ``num_points_scale``); ``enc_output.{0,1}`` <-> ``enc_output.proj`` / ``.norm``; ``class_embed`` /
  ``bbox_embed`` <-> ``dec_score_head`` / ``dec_bbox_head``;
- attention: separate q/k/v projections <-> one fused ``in_proj_weight`` / ``in_proj_bias`` (rows q, k, v);
- the per-layer heads: HF ties ``class_embed.{i}`` / ``bbox_embed.{i}`` to ``model.decoder.class_embed.{i}`` /
  ``model.decoder.bbox_embed.{i}`` and saves the decoder's copy; either copy is read, both must agree;
- ``decoder.anchors`` / ``decoder.valid_mask`` (ours: saved buffers of the eval size) are not HF weights: HF
  computes them per input. They are rebuilt from the eval size on the way in and dropped on the way out.

A tensor left over on either side raises `MappingError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from interop.hf_detr import MappingError
from models.rtdetrv2 import generate_anchors

__all__ = ["ANCHOR_KEYS", "eval_anchors", "hf_to_project_state", "project_to_hf_state", "rule_pairs"]

_B = "model.backbone.model."
#: Our derived anchor buffers (no HF weight).
ANCHOR_KEYS = ("decoder.anchors", "decoder.valid_mask")

# (ours, HF) key templates: {s}, {j}, {i}, {l} are indices, {leaf} a tensor name (weight, bias, running_mean, ...),
# {rest} any dotted tail. Ordered: the first template that matches a key names it.
_STEM = [(f"backbone.conv1.conv1_{n + 1}.{m}.{{leaf}}", f"{_B}embedder.embedder.{n}.{h}.{{leaf}}")
         for n in range(3) for m, h in (("conv", "convolution"), ("norm", "normalization"))]  # fmt: skip
_BLOCK, _LAYER = "backbone.res_layers.{s}.blocks.{j}.", f"{_B}encoder.stages.{{s}}.layers.{{j}}."
_BACKBONE = [
    *((f"{_BLOCK}branch2{b}.{m}.{{leaf}}", f"{_LAYER}layer.{n}.{h}.{{leaf}}")
      for n, b in enumerate("abc") for m, h in (("conv", "convolution"), ("norm", "normalization"))),
    (f"{_BLOCK}short.conv.conv.{{leaf}}", f"{_LAYER}shortcut.1.convolution.{{leaf}}"),  # after the 2x2 avg pool
    (f"{_BLOCK}short.conv.norm.{{leaf}}", f"{_LAYER}shortcut.1.normalization.{{leaf}}"),
    (f"{_BLOCK}short.conv.{{leaf}}", f"{_LAYER}shortcut.convolution.{{leaf}}"),  # stage 0: no pool
    (f"{_BLOCK}short.norm.{{leaf}}", f"{_LAYER}shortcut.normalization.{{leaf}}"),
]  # fmt: skip
_AIFI, _HF_AIFI = "encoder.encoder.{i}.layers.{j}.", "model.encoder.encoder.{i}.layers.{j}."
_DEC, _HF_DEC = "decoder.decoder.layers.{i}.", "model.decoder.layers.{i}."
_DEFORMABLE = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
_REST = [
    ("encoder.input_proj.{l}.conv.{leaf}", "model.encoder_input_proj.{l}.0.{leaf}"),
    ("encoder.input_proj.{l}.norm.{leaf}", "model.encoder_input_proj.{l}.1.{leaf}"),
    *((f"{_AIFI}{o}.{{leaf}}", f"{_HF_AIFI}{h}.{{leaf}}") for o, h in (
        ("self_attn.out_proj", "self_attn.out_proj"), ("linear1", "fc1"), ("linear2", "fc2"),
        ("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"))),
    *((f"encoder.{m}.{{rest}}", f"model.encoder.{m}.{{rest}}")
      for m in ("lateral_convs", "fpn_blocks", "downsample_convs", "pan_blocks")),
    ("decoder.input_proj.{l}.conv.{leaf}", "model.decoder_input_proj.{l}.0.{leaf}"),
    ("decoder.input_proj.{l}.norm.{leaf}", "model.decoder_input_proj.{l}.1.{leaf}"),
    *((f"{_DEC}{o}.{{leaf}}", f"{_HF_DEC}{h}.{{leaf}}") for o, h in (
        ("self_attn.out_proj", "self_attn.out_proj"), ("norm1", "self_attn_layer_norm"),
        *((f"cross_attn.{m}", f"encoder_attn.{m}") for m in _DEFORMABLE), ("norm2", "encoder_attn_layer_norm"),
        ("linear1", "fc1"), ("linear2", "fc2"), ("norm3", "final_layer_norm"))),
    (f"{_DEC}cross_attn.num_points_scale", f"{_HF_DEC}encoder_attn.n_points_scale"),
    ("decoder.denoising_class_embed.{leaf}", "model.denoising_class_embed.{leaf}"),
    ("decoder.query_pos_head.layers.{j}.{leaf}", "model.decoder.query_pos_head.layers.{j}.{leaf}"),
    ("decoder.enc_output.proj.{leaf}", "model.enc_output.0.{leaf}"),
    ("decoder.enc_output.norm.{leaf}", "model.enc_output.1.{leaf}"),
    ("decoder.enc_score_head.{leaf}", "model.enc_score_head.{leaf}"),
    ("decoder.enc_bbox_head.layers.{j}.{leaf}", "model.enc_bbox_head.layers.{j}.{leaf}"),
    ("decoder.dec_score_head.{i}.{leaf}", "model.decoder.class_embed.{i}.{leaf}"),
    ("decoder.dec_bbox_head.{i}.layers.{j}.{leaf}", "model.decoder.bbox_embed.{i}.layers.{j}.{leaf}"),
]  # fmt: skip
# Fused attention inputs: our in_proj_{kind} <-> HF's q, k, v projections (in that row order).
_FUSED = [(f"{p}self_attn.in_proj_{{kind}}", tuple(f"{h}self_attn.{x}_proj.{{kind}}" for x in "qkv"))
          for p, h in ((_AIFI, _HF_AIFI), (_DEC, _HF_DEC))]  # fmt: skip

# Other spellings of the same HF tensors -> the saved layout (transformers 5.x in-memory names).
_HF_ALIASES = (
    (re.compile(r"^model\.encoder\.aifi\."), "model.encoder.encoder."),
    (re.compile(r"\.self_attn\.o_proj\."), ".self_attn.out_proj."),
    (re.compile(r"\.mlp\.fc([12])\."), r".fc\1."),
)
# HF's tied top-level heads -> the decoder's copy, which save_pretrained writes.
_TIED = re.compile(r"^(class_embed|bbox_embed)\.")

_FIELDS = {"leaf": r"(?P<leaf>[a-z_]+)", "rest": r"(?P<rest>[\w.]+)", "kind": r"(?P<kind>weight|bias)"}


def _regex(template: str) -> re.Pattern[str]:
    """``template`` as an anchored regex: {leaf}/{rest}/{kind} as in _FIELDS, any other {name} an index."""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for n, part in enumerate(parts):
        out.append(re.escape(part) if n % 2 == 0 else _FIELDS.get(part, rf"(?P<{part}>\d+)"))
    return re.compile("^" + "".join(out) + "$")


def rule_pairs() -> list[tuple[str, str]]:
    """The (ours, HF) key templates of every one-to-one tensor (the fused attention inputs aside)."""
    return [*_STEM, *_BACKBONE, *_REST]


_RULES = [(_regex(o), o, _regex(h), h) for o, h in rule_pairs()]
_FUSED_RULES = [(_regex(o), o, tuple(_regex(h) for h in hs), hs) for o, hs in _FUSED]


def _listed(keys: Sequence[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(list(keys)[:limit]) + more


# ------------------------------------------------------------------------------------------ ours -> HF


def project_to_hf_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our RT-DETRv2 state dict (published names) -> HF weights (saved names), each tensor a contiguous copy.

    The anchor buffers (``ANCHOR_KEYS``) are left out: HF computes anchors per input.

    Raises:
        MappingError: a tensor of ours has no HF counterpart, or a fused projection does not split in three.
    """
    hf: dict[str, Tensor] = {}
    leftover = []
    for key, value in state.items():
        if key in ANCHOR_KEYS:
            continue
        target = _ours_to_hf(key, value)
        if target is None:
            leftover.append(key)
        hf.update(target or {})
    if leftover:
        raise MappingError(f"RT-DETRv2 tensors with no HF counterpart: {_listed(sorted(leftover))}")
    return hf


def _ours_to_hf(key: str, value: Tensor) -> dict[str, Tensor] | None:
    for ours, _, _, hf in _RULES:
        if match := ours.match(key):
            return {hf.format(**match.groupdict()): value.clone().contiguous()}
    for ours, _, _, hfs in _FUSED_RULES:
        if match := ours.match(key):
            if value.shape[0] % 3:
                raise MappingError(f"{key}: {value.shape[0]} rows do not split into q, k, v projections")
            parts = value.chunk(3)
            return {h.format(**match.groupdict()): p.clone().contiguous() for h, p in zip(hfs, parts)}
    return None


# ------------------------------------------------------------------------------------------ HF -> ours


def canonical_hf(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors under their saved names: in-memory spellings renamed, tied head copies folded into the decoder's.

    Raises:
        MappingError: two copies of one tied head differ.
    """
    out: dict[str, Tensor] = {}
    tied: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        for pattern, new in _HF_ALIASES:
            key = pattern.sub(new, key)
        if _TIED.match(key):
            tied["model.decoder." + key] = value
        else:
            out[key] = value
    for key, value in tied.items():
        if key in out and not torch.equal(out[key], value):
            raise MappingError(f"HF {key[len('model.decoder.') :]} differs from {key}; RT-DETRv2 ties them")
        out.setdefault(key, value)
    return out


def hf_to_project_state(hf_state: Mapping[str, Tensor], eval_size: Sequence[int] | None) -> dict[str, Tensor]:
    """HF RT-DETRv2 weights -> our state dict (published names).

    ``eval_size``: (H, W) whose anchors our model keeps as buffers (``--eval_spatial_size``); None: no buffers.

    Raises:
        MappingError: an HF tensor has no place in our model.
    """
    state: dict[str, Tensor] = {}
    leftover = []
    hf = canonical_hf(hf_state)
    fused: dict[str, dict[int, Tensor]] = {}
    for key, value in hf.items():
        if not _hf_to_ours(key, value, state, fused):
            leftover.append(key)
    if leftover:
        raise MappingError(f"HF weights not mapped to this project's RT-DETRv2: {_listed(sorted(leftover))}")
    incomplete = [k for k, parts in fused.items() if len(parts) != 3]
    if incomplete:
        raise MappingError(f"HF weights lack q/k/v projections of {_listed(sorted(incomplete))}")
    state.update({k: torch.cat([parts[n] for n in range(3)]) for k, parts in fused.items()})
    if eval_size:
        state.update(eval_anchors(eval_size))
    return state


def eval_anchors(eval_size: Sequence[int]) -> dict[str, Tensor]:
    """Our anchor buffers (``ANCHOR_KEYS``) of an (H, W) eval size: [1, S, 4] logits and [1, S, 1] validity."""
    anchors, valid = generate_anchors([(eval_size[0] // s, eval_size[1] // s) for s in (8, 16, 32)])
    return dict(zip(ANCHOR_KEYS, (anchors, valid)))


def _hf_to_ours(key: str, value: Tensor, state: dict[str, Tensor], fused: dict[str, dict[int, Tensor]]) -> bool:
    for _, ours, hf, _ in _RULES:
        if match := hf.match(key):
            state[ours.format(**match.groupdict())] = value
            return True
    for _, ours, hfs, _ in _FUSED_RULES:
        for n, hf in enumerate(hfs):
            if match := hf.match(key):
                fused.setdefault(ours.format(**match.groupdict()), {})[n] = value
                return True
    return False
