"""The DETR detector (paper section 3.2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from ..heads import MLP, aux_outputs
from .spatial_prior import SPATIAL_PRIORS, anchor_boxes
from .transformer import BoxHead, Transformer

__all__ = ["DETR", "as_nested_tensor"]


def as_nested_tensor(samples: NestedTensor | list[Tensor] | Tensor) -> NestedTensor:
    """A model input as a NestedTensor: a list of [3, H_i, W_i] images is padded, a [B, 3, H, W] batch becomes
    B unpadded images (as published). Scriptable."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, Tensor):
        return nested_tensor_from_tensor_list(samples.unbind(0))
    return nested_tensor_from_tensor_list(samples)


class DETR(nn.Module):
    """DEtection TRansformer: backbone, encoder-decoder, class and box heads.

    Args:
        backbone: ``models.backbone.Joiner`` (features and position encodings).
        transformer: ``models.detr.transformer.Transformer``.
        num_classes: K; the class head has K + 1 outputs, the last meaning "no object".
        num_queries: object queries, the most objects one image can yield.
        aux_loss: also return the predictions of every intermediate decoder layer.
    """

    def __init__(
        self,
        backbone: nn.Module,
        transformer: Transformer,
        num_classes: int,
        num_queries: int,
        aux_loss=False,
        spatial_prior: str = "none",
        box_refine: bool = False,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        if spatial_prior not in SPATIAL_PRIORS:
            raise ValueError(f"--spatial_prior {spatial_prior}: expected one of {SPATIAL_PRIORS}")
        self.spatial_prior = spatial_prior
        self.box_refine = box_refine

    # No return annotation: TorchScript infers Dict[str, Tensor] (as the published scripted model returns), while
    # the eager dict also holds the 'aux_outputs' list.
    def forward(self, samples: NestedTensor | list[Tensor] | Tensor):
        """Detect objects.

        Args:
            samples: NestedTensor ([B, 3, H, W] images, [B, H, W] mask True on padding), a list of [3, H_i, W_i]
                normalised images (padded here), or a [B, 3, H, W] tensor without padding.

        Returns:
            'pred_logits' [B, Q, K + 1]; 'pred_boxes' [B, Q, 4] (cx, cy, w, h) in [0, 1] relative to each
            unpadded image; with aux_loss, 'aux_outputs': L - 1 dicts of the same two keys, first layer first.
        """
        samples = as_nested_tensor(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        hs = self.run_transformer(self.input_proj(src), mask, pos[-1])[0]
        outputs_class = self.class_embed(hs)
        outputs_coord = self.predict_boxes(hs)
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if not torch.jit.is_scripting():  # a scripted model returns Dict[str, Tensor]: no auxiliary outputs
            if self.aux_loss:
                out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    def __prepare_scriptable__(self) -> DETR:
        """Called by ``torch.jit.script``: the opt-in decoder options are eager / torch.export only."""
        if self.spatial_prior != "none" or self.box_refine:
            raise RuntimeError(
                "torch.jit.script: --spatial_prior and --box_refine models cannot be scripted (the prior passes the "
                "box head to the decoder as a callable); export them with torch.export (tools/export.py)"
            )
        return self

    def run_transformer(self, src: Tensor, mask: Tensor | None, pos: Tensor) -> tuple[Tensor, Tensor]:
        """``self.transformer`` on projected features [B, D, H, W] -> (hs [L, B, Q, D], memory [B, D, H, W]),
        with the spatial prior and its first-layer anchors when enabled."""
        if torch.jit.is_scripting():
            return self.transformer(src, mask, self.query_embed.weight, pos)
        box_head = self.prior_box_head()
        anchors = None if box_head is None else self.anchors(src.shape[0], src.device)
        return self.transformer(src, mask, self.query_embed.weight, pos, box_head, anchors)

    def anchors(self, batch: int, device: torch.device) -> Tensor | None:
        """The first decoder layer's fixed reference boxes [B, Q, 4] (``anchor_boxes``), or None when the
        model uses neither a spatial prior nor box refinement (published)."""
        if self.spatial_prior == "none" and not self.box_refine:
            return None
        return anchor_boxes(self.num_queries, device).expand(batch, -1, -1)

    def predict_boxes(self, hs: Tensor) -> Tensor:
        """Decoder outputs [L, B, Q, D] -> boxes [L, B, Q, 4] (cx, cy, w, h in [0, 1]).

        Published: every layer's box is ``bbox_embed(h).sigmoid()``. With ``box_refine`` every layer predicts a
        correction in logit space to the previous layer's (detached) box, the first layer to its anchor: the
        iterative refinement of Deformable DETR with the one shared ``bbox_embed`` (no new weights).
        """
        deltas = self.bbox_embed(hs)
        if torch.jit.is_scripting():  # box_refine models are not scriptable (``__prepare_scriptable__``)
            return deltas.sigmoid()
        if not self.box_refine:
            return deltas.sigmoid()
        boxes: list[Tensor] = []
        previous = self.anchors(hs.shape[1], hs.device)
        for delta in deltas:
            previous = self._apply_delta(delta, previous)
            boxes.append(previous)
        return torch.stack(boxes)

    def _apply_delta(self, delta: Tensor, previous: Tensor | None) -> Tensor:
        """Box [..., 4] from the box head's output: refined from the (detached) previous box, or absolute."""
        if self.box_refine and previous is not None:
            return (delta + torch.logit(previous.detach(), eps=1e-5)).sigmoid()
        return delta.sigmoid()

    def _layer_box(self, h: Tensor, previous: Tensor | None) -> Tensor:
        """One decoder layer's boxes [B, Q, 4] from its normalised output (and the previous layer's boxes)."""
        return self._apply_delta(self.bbox_embed(h), previous)

    def prior_box_head(self) -> BoxHead | None:
        """What the decoder's spatial prior reads each layer's boxes with, or None without a prior (published)."""
        return self._layer_box if self.spatial_prior == "gaussian" else None

    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor) -> list[dict[str, Tensor]]:
        """[L, B, Q, K+1], [L, B, Q, 4] -> the L - 1 intermediate layers as output dicts."""
        return aux_outputs(outputs_class, outputs_coord)
