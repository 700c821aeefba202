"""Training-curve and precision-recall plots: data drawn equals the logs / COCOeval, PNGs are written."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from util.plot_utils import ewm, field_series, load_eval_results, mean_precision_curve, plot_logs, plot_precision_recall


def _write_log(path, epochs, offset=0.0, eval_every=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(epochs):
        record = {"epoch": epoch, "train_loss": 10.0 - epoch + offset, "train_class_error": 50.0 / (epoch + 1)}
        if epoch % eval_every == 0:
            record["test_loss"] = 11.0 - epoch + offset
            record["test_coco_eval_bbox"] = [0.1 * epoch + k / 100 for k in range(12)]
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        # Not a blank canvas: something was drawn.
        low, high = image.convert("L").getextrema()
        assert high - low > 50


def test_ewm_matches_explicit_weights():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    com = 2.0
    alpha = 1 / (1 + com)
    expected = [
        sum((1 - alpha) ** (t - i) * values[i] for i in range(t + 1))
        / sum((1 - alpha) ** (t - i) for i in range(t + 1))
        for t in range(len(values))
    ]
    np.testing.assert_allclose(ewm(values, com), expected)
    np.testing.assert_array_equal(ewm(values, 0), values)


def test_field_series_reads_keys_indices_and_coco_names(tmp_path):
    from util.plot_utils import read_log

    records = read_log(_write_log(tmp_path / "run" / "log.txt", 5, eval_every=2))
    epochs, values = field_series(records, "train_loss")
    np.testing.assert_array_equal(epochs, range(5))
    np.testing.assert_array_equal(values, [10.0 - e for e in range(5)])
    epochs, values = field_series(records, "AP50")
    np.testing.assert_array_equal(epochs, [0, 2, 4])
    np.testing.assert_allclose(values, [0.1 * e + 0.01 for e in (0, 2, 4)])
    np.testing.assert_array_equal(field_series(records, "test_coco_eval_bbox[1]")[1], values)


def test_plot_logs_draws_each_run_and_writes_png(tmp_path):
    log_a = _write_log(tmp_path / "a" / "log.txt", 6)
    _write_log(tmp_path / "b" / "log.txt", 4, offset=1.0)
    out = tmp_path / "plots" / "curves.png"
    fig = plot_logs([log_a, tmp_path / "b"], fields=("loss", "AP"), ewm_col=0, output=out)
    _assert_png(out)
    loss_ax, ap_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"a train", "a test", "b train", "b test"}
    np.testing.assert_array_equal(lines["b test"].get_ydata(), [12.0 - e for e in range(4)])
    ap_lines = {line.get_label(): line for line in ap_ax.get_lines()}
    np.testing.assert_allclose(ap_lines["a"].get_ydata(), [0.1 * e for e in range(6)])


def test_plot_logs_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log"):
        plot_logs(tmp_path / "missing")
    bad = tmp_path / "bad" / "log.txt"
    bad.parent.mkdir()
    bad.write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"log.txt:2: not a JSON line"):
        plot_logs(bad)
    good = _write_log(tmp_path / "good" / "log.txt", 2)
    with pytest.raises(ValueError, match="logged keys"):
        plot_logs(good, fields=("nonexistent",))


def _coco_eval():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    images, annotations, detections = [], [], []
    for image_id in range(1, 6):
        images.append({"id": image_id, "width": 100, "height": 100})
        for k in range(3):
            x, y = rng.uniform(0, 60, size=2)
            w, h = rng.uniform(10, 40, size=2)
            category = 1 + k % 2
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
                 "area": w * h, "iscrowd": 0}
            )  # fmt: skip
            jitter = rng.normal(0, 4, size=4)
            detections.append(
                {"image_id": image_id, "category_id": category, "bbox": list(np.array([x, y, w, h]) + jitter),
                 "score": float(rng.uniform(0.2, 1.0))}
            )  # fmt: skip
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def test_precision_recall_matches_coco_stats_and_files(tmp_path):
    evaluator = _coco_eval()
    results = load_eval_results(evaluator)
    assert results["precision"].shape == (10, 101, 2, 4, 3)
    # Independent oracle: COCO's AP and AP50 are the means of these curves.
    np.testing.assert_allclose(np.nanmean(mean_precision_curve(results, iou=None)), evaluator.stats[0], atol=1e-12)
    np.testing.assert_allclose(np.nanmean(mean_precision_curve(results, iou=0.5)), evaluator.stats[1], atol=1e-12)

    pth = tmp_path / "eval" / "checkpoint0009.pth"
    pth.parent.mkdir()
    torch.save(evaluator.eval, pth)  # the published layout: includes pycocotools' Params object
    npz = tmp_path / "latest.npz"
    np.savez(npz, precision=evaluator.eval["precision"])
    for source in (pth, npz, {"precision": torch.from_numpy(evaluator.eval["precision"])}):
        np.testing.assert_array_equal(load_eval_results(source)["precision"], results["precision"])

    out = tmp_path / "pr.png"
    fig = plot_precision_recall([pth, npz], output=out, ious=(0.5,))
    _assert_png(out)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[0].startswith("checkpoint0009 IoU 0.50") and labels[1].startswith("latest IoU 0.50")
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), mean_precision_curve(results, 0.5))

    with pytest.raises(ValueError, match="not an evaluated threshold"):
        mean_precision_curve(results, iou=0.42)
    with pytest.raises(ValueError, match=r"\[T,R,K,A,M\]"):
        load_eval_results({"precision": np.zeros((3, 4))})


def test_plot_logs_cli(tmp_path, monkeypatch):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
    import plot_logs as tool

    log = _write_log(tmp_path / "run" / "log.txt", 3)
    npz = tmp_path / "eval.npz"
    np.savez(npz, precision=_coco_eval().eval["precision"])
    args = tool.get_args_parser().parse_args(
        [str(log), "--output", str(tmp_path / "c.png"), "--pr", str(npz), "--pr_output", str(tmp_path / "p.png")]
    )
    written = tool.main(args)
    assert written == [tmp_path / "c.png", tmp_path / "p.png"]
    for path in written:
        _assert_png(path)
    with pytest.raises(SystemExit, match="no training log"):
        tool.main(tool.get_args_parser().parse_args([str(tmp_path / "nothing")]))
