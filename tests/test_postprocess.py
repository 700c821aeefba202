"""PostProcess: best real class, its probability, boxes scaled to the original (h, w) as absolute xyxy."""

from __future__ import annotations

import math

import pytest
import torch

from models.detr import PostProcess as PostProcessFromDetr
from models.postprocess import PostProcess


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
