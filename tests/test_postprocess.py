"""PostProcess (best real class per query) and PostProcessTopK (top-k (query, class) pairs), boxes in pixels."""

from __future__ import annotations

import math

import pytest
import torch

from models.detr import PostProcess as PostProcessFromDetr
from models.postprocess import PostProcess, PostProcessTopK


def test_scores_labels_and_scaled_boxes():
    logits = torch.tensor([[[1.0, 3.0, 0.0, 5.0], [2.0, 0.0, 1.0, -1.0]], [[0.0, 0.0, 4.0, 0.0], [0.0, 0.5, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]], [[0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.0, 0.0]]])
    sizes = torch.tensor([[100, 200], [30, 40]])  # (height, width)
    results = PostProcess()(dict(pred_logits=logits, pred_boxes=boxes), sizes)
    assert len(results) == 2
    # query 0 of image 0: "no object" is most likely, but the best real class (1) is reported with its probability
    denom = math.exp(1) + math.exp(3) + math.exp(0) + math.exp(5)
    assert results[0]["labels"].tolist() == [1, 0]
    assert results[0]["scores"][0].item() == pytest.approx(math.exp(3) / denom)
    torch.testing.assert_close(
        results[0]["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    )
    torch.testing.assert_close(results[1]["boxes"], torch.tensor([[0.0, 0.0, 40.0, 30.0], [4.0, 6.0, 4.0, 6.0]]))
    assert results[1]["labels"].tolist() == [2, 1]
    assert results[1]["scores"][1].item() == pytest.approx(math.exp(0.5) / (3 + math.exp(0.5)))
    assert results[0]["labels"].dtype == torch.int64


def test_bad_target_sizes_raise_and_published_import_path():
    outputs = dict(pred_logits=torch.zeros(2, 3, 5), pred_boxes=torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, torch.tensor([[10, 10]]))
    assert PostProcessFromDetr is PostProcess


def _explicit_top_k(logits: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], k: int) -> list[tuple]:
    """Every (score, query, label) pair of one image, sorted by hand -> the k best with pixel xyxy boxes."""
    height, width = size
    pairs = []
    for q, row in enumerate(logits.tolist()):
        for c, x in enumerate(row):
            pairs.append((1 / (1 + math.exp(-x)), q, c))
    pairs.sort(key=lambda t: -t[0])
    result = []
    for score, q, c in pairs[:k]:
        cx, cy, w, h = boxes[q].tolist()
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        result.append((score, c, box))
    return result


@pytest.mark.parametrize("num_select", [100, 300])
def test_top_k_over_all_query_class_pairs_equals_explicit_sort(num_select):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 40, 9, generator=generator) * 3  # 360 pairs per image
    boxes = torch.rand(2, 40, 4, generator=generator) * 0.5 + 0.2
    sizes = torch.tensor([[100, 200], [480, 640]])
    results = PostProcessTopK(num_select)(dict(pred_logits=logits, pred_boxes=boxes), sizes)
    for b, result in enumerate(results):
        expected = _explicit_top_k(logits[b], boxes[b], tuple(sizes[b].tolist()), num_select)
        assert (
            result["scores"].shape == result["labels"].shape == (num_select,) and result["boxes"].shape[0] == num_select
        )
        assert result["labels"].dtype == torch.int64
        assert result["scores"].tolist() == pytest.approx([e[0] for e in expected], rel=1e-6)
        assert result["labels"].tolist() == [e[1] for e in expected]
        torch.testing.assert_close(result["boxes"], torch.tensor([e[2] for e in expected]), rtol=1e-5, atol=1e-4)


def test_top_k_picks_several_classes_of_one_query_and_defaults_to_100():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2], logits[0, 1, 0], logits[0, 2, 3] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]])
    result = PostProcessTopK(num_select=3)(dict(pred_logits=logits, pred_boxes=boxes), torch.tensor([[10, 20]]))[0]
    assert result["labels"].tolist() == [2, 0, 3]
    torch.testing.assert_close(result["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2 + [[0.0, 0.0, 20.0, 10.0]]))
    assert PostProcessTopK().num_select == 100
    # fewer pairs than num_select: all of them
    assert (
        len(PostProcessTopK(300)(dict(pred_logits=logits, pred_boxes=boxes), torch.tensor([[10, 20]]))[0]["scores"])
        == 12
    )


def test_top_k_keeps_overlapping_boxes_and_refuses_bad_target_sizes():
    logits = torch.tensor([[[4.0], [3.0], [2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    outputs = dict(pred_logits=logits, pred_boxes=boxes)
    kept = PostProcessTopK(3)(outputs, torch.tensor([[100, 100]]))[0]
    assert kept["scores"].tolist() == pytest.approx(torch.sigmoid(torch.tensor([4.0, 3.0, 2.0])).tolist())  # no NMS
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcessTopK()(outputs, torch.tensor([[10, 10], [10, 10]]))
