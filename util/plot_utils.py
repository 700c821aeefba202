"""Plots of training logs (log.txt, one JSON object per line) and COCO precision-recall curves, as PNG.

Uses matplotlib's object API (``matplotlib.figure.Figure``), so nothing depends on a display or on
pyplot's global state; the returned figures also render inline in notebooks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

# Positions in the 12 COCO summary stats logged as test_coco_eval_bbox (pycocotools' summarize order).
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_COCO_STAT_ALIASES = {"mAP": "AP"}


# Curves with at most this many points are drawn with markers.
MARKER_MAX_POINTS = 20


def read_log(path: str | Path, log_name: str = "log.txt") -> list[dict[str, Any]]:
    """Read one training log: a log.txt path, or an output folder that holds ``log_name``.

    Returns:
        One dict per non-empty line, in file order.
    """
    path = Path(path)
    if path.is_dir():
        path = path / log_name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log here; pass a log.txt or the output_dir that holds it")
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not a JSON line ({err.msg}); is this a DETR log.txt?") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def ewm(values: Sequence[float], com: float = 0.0) -> np.ndarray:
    """Exponentially weighted mean with centre of mass ``com`` (pandas ``ewm(com).mean()``, adjust=True).

    ``com=0`` returns the values unchanged.
    """
    values = np.asarray(values, dtype=float)
    if com < 0:
        raise ValueError(f"ewm_col (centre of mass) must be >= 0, got {com}")
    decay = com / (1.0 + com)
    out = np.empty_like(values)
    numerator = denominator = 0.0
    for i, value in enumerate(values):
        numerator = numerator * decay + value
        denominator = denominator * decay + 1.0
        out[i] = numerator / denominator
    return out


def _coco_stat_index(field: str) -> tuple[str, int] | None:
    """``"AP50"`` -> ("bbox", 1); ``"segm_AP"`` -> ("segm", 0); None for a plain field."""
    iou_type, _, stat = field.rpartition("_") if field.startswith(("bbox_", "segm_")) else ("bbox", "", field)
    stat = _COCO_STAT_ALIASES.get(stat, stat)
    if stat in COCO_STAT_NAMES:
        return iou_type, COCO_STAT_NAMES.index(stat)
    return None


def field_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of one logged key (``"train_loss"``, ``"test_coco_eval_bbox[0]"``, ``"AP50"``...).

    Records without the key (e.g. epochs without evaluation) are skipped. The epoch is the record's
    'epoch' entry, or its line index when absent.
    """
    index = None
    stat = _coco_stat_index(key)
    if stat is not None:
        key, index = f"test_coco_eval_{stat[0]}", stat[1]
    elif key.endswith("]") and "[" in key:
        key, _, rest = key.partition("[")
        index = int(rest[:-1])
    epochs, values = [], []
    for line, record in enumerate(records):
        value = record.get(key)
        if value is None:
            continue
        if index is not None:
            if not isinstance(value, Sequence) or len(value) <= index:
                continue
            value = value[index]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        epochs.append(record.get("epoch", line))
        values.append(float(value))
    return np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)


def _series_for_field(records: Sequence[Mapping[str, Any]], field: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The (label, epochs, values) curves of a field: COCO stats, an exact key, or train_/test_ pairs."""
    if _coco_stat_index(field) is not None or "[" in field or any(field == k for r in records for k in r):
        candidates = [("", field)]
    else:
        candidates = [("train", f"train_{field}"), ("test", f"test_{field}")]
    curves = []
    for label, key in candidates:
        epochs, values = field_series(records, key)
        if len(values):
            curves.append((label, epochs, values))
    return curves


def plot_logs(
    logs: str | Path | Sequence[str | Path],
    fields: Sequence[str] = ("class_error", "loss_bbox_unscaled", "AP"),
    ewm_col: float = 0,
    log_name: str = "log.txt",
    output: str | Path | None = None,
    names: Sequence[str] | None = None,
) -> Figure:
    """Training curves of one or several runs, one panel per field.

    Args:
        logs: log.txt files or output folders holding ``log_name``.
        fields: a name ``X`` plots ``train_X`` (solid) and ``test_X`` (dashed) when logged; COCO stat names
            (AP, AP50, AP75, APs, APm, APl, AR1 ... ARl; "segm_AP" for masks) read ``test_coco_eval_*``;
            any exact key such as ``train_lr`` or ``test_coco_eval_bbox[1]`` is plotted as is.
        ewm_col: centre of mass of the exponential smoothing (0: none).
        log_name: file name inside folders.
        output: PNG path to write (parent folders are created); None only returns the figure.
        names: legend label per run (default: the log's folder name).

    Returns:
        The matplotlib Figure.
    """
    paths = [logs] if isinstance(logs, (str, Path)) else list(logs)
    if not paths:
        raise ValueError("plot_logs needs at least one log.txt or output folder")
    if not fields:
        raise ValueError("plot_logs needs at least one field to plot")
    runs = [read_log(p, log_name) for p in paths]
    labels = list(names) if names else [_run_name(p, log_name) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} names for {len(paths)} logs")

    fig = Figure(figsize=(5 * len(fields), 4), layout="constrained")
    axes = fig.subplots(1, len(fields), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    missing = []
    for ax, field in zip(axes, fields):
        drew = False
        for records, label, color in zip(runs, labels, colors):
            for split, epochs, values in _series_for_field(records, field):
                style = "--" if split == "test" else "-"
                legend = f"{label} {split}".strip()
                # A line needs two points: a short run (one epoch: one point) gets markers, or it draws nothing.
                marker = "o" if len(epochs) <= MARKER_MAX_POINTS else None
                ax.plot(epochs, ewm(values, ewm_col), style, color=color, label=legend, marker=marker)
                drew = True
        if not drew:
            missing.append(field)
            ax.text(0.5, 0.5, f"'{field}' not logged", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize="small")
        ax.set_title(field)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    if len(missing) == len(fields):
        keys = sorted({k for records in runs for r in records for k in r})
        raise ValueError(f"none of the fields {list(fields)} is in the logs; logged keys: {keys}")
    if output is not None:
        _save(fig, output)
    return fig


def _run_name(path: str | Path, log_name: str) -> str:
    path = Path(path)
    return (path if path.is_dir() else path.parent).resolve().name or str(path)


def _save(fig: Figure, output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    return output


# --------------------------------------------------------------------------------------------------------
# Precision-recall curves
# --------------------------------------------------------------------------------------------------------

_DEFAULT_IOU_THRS = np.linspace(0.5, 0.95, 10)
_DEFAULT_REC_THRS = np.linspace(0.0, 1.0, 101)


def load_eval_results(source: Any) -> dict[str, np.ndarray]:
    """Normalise evaluation results to ``{'precision' [T,R,K,A,M], 'iou_thrs' [T], 'rec_thrs' [R], ...}``.

    ``source`` may be a pycocotools/faster-coco-eval ``COCOeval`` after ``accumulate()``, its ``.eval`` dict,
    any dict with a 'precision' array, or a file: ``.npz`` (arrays 'precision' and optionally 'iou_thrs',
    'rec_thrs', 'scores'), or ``.pth``/``.pt`` holding such a dict (loaded with ``weights_only=True``;
    pycocotools' Params object is allowed through). T: IoU thresholds, R: recall thresholds, K: categories,
    A: area ranges (all, small, medium, large), M: max detections (1, 10, 100). Entries of -1 mark
    categories without ground truth.
    """
    if isinstance(source, (str, Path)):
        source = _load_eval_file(Path(source))
    if hasattr(source, "eval") and hasattr(source, "params") and isinstance(source.eval, Mapping):
        params = source.params
        source = dict(source.eval, params=params)
    if not isinstance(source, Mapping) or "precision" not in source:
        raise ValueError("evaluation results need a 'precision' array [T,R,K,A,M]; run COCOeval.accumulate() first")
    precision = np.asarray(_to_numpy(source["precision"]), dtype=float)
    if precision.ndim != 5:
        raise ValueError(f"'precision' must be [T,R,K,A,M] (5 dims), got shape {precision.shape}")
    params = source.get("params")
    iou_thrs = source.get("iou_thrs", getattr(params, "iouThrs", None))
    rec_thrs = source.get("rec_thrs", getattr(params, "recThrs", None))
    if iou_thrs is None:
        iou_thrs = _DEFAULT_IOU_THRS if precision.shape[0] == 10 else np.linspace(0.5, 0.95, precision.shape[0])
    if rec_thrs is None:
        rec_thrs = np.linspace(0.0, 1.0, precision.shape[1])
    result = {
        "precision": precision,
        "iou_thrs": np.asarray(_to_numpy(iou_thrs), dtype=float),
        "rec_thrs": np.asarray(_to_numpy(rec_thrs), dtype=float),
    }
    if source.get("scores") is not None:
        result["scores"] = np.asarray(_to_numpy(source["scores"]), dtype=float)
    if len(result["iou_thrs"]) != precision.shape[0] or len(result["rec_thrs"]) != precision.shape[1]:
        raise ValueError(
            f"threshold lengths ({len(result['iou_thrs'])} IoU, {len(result['rec_thrs'])} recall) do not match "
            f"'precision' shape {precision.shape}"
        )
    return result


def _to_numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _load_eval_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation results file here")
    if path.suffix in (".npz", ".npy"):
        data = np.load(path, allow_pickle=False)
        return dict(data) if path.suffix == ".npz" else {"precision": data}
    import torch  # only needed for .pth files

    multiarray = np._core.multiarray
    safe = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *{type(np.dtype(t)) for t in "fdilq?"}]
    for module, name in (("pycocotools.cocoeval", "Params"), ("faster_coco_eval.core.cocoeval", "Params")):
        try:
            safe.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure gets the same advice
        raise ValueError(
            f"{path}: cannot load evaluation results safely ({type(err).__name__}); save them as .npz "
            "(np.savez(path, precision=coco_eval.eval['precision'])) or a dict of tensors/arrays"
        ) from err


def mean_precision_curve(
    results: Mapping[str, np.ndarray], iou: float | None = 0.5, area: int = 0, max_dets: int = -1
) -> np.ndarray:
    """Precision per recall threshold [R], averaged over categories that have ground truth.

    Args:
        results: output of :func:`load_eval_results`.
        iou: IoU threshold (must be one of ``results['iou_thrs']``), or None to average over all of them.
        area: area-range index (0 all, 1 small, 2 medium, 3 large).
        max_dets: max-detections index (-1: the largest, 100 for COCO).
    """
    precision = results["precision"][:, :, :, area, max_dets]  # [T, R, K]
    if iou is not None:
        matches = np.flatnonzero(np.isclose(results["iou_thrs"], iou))
        if len(matches) == 0:
            raise ValueError(f"IoU {iou} is not an evaluated threshold; choose one of {results['iou_thrs'].tolist()}")
        precision = precision[matches[0] : matches[0] + 1]
    valid = precision > -1
    counts = valid.sum(axis=(0, 2))
    sums = np.where(valid, precision, 0.0).sum(axis=(0, 2))
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_precision_recall(
    files: Any | Sequence[Any],
    naming_scheme: str = "iter",
    output: str | Path | None = None,
    ious: Sequence[float | None] = (0.5, 0.75, None),
    names: Sequence[str] | None = None,
) -> Figure:
    """Precision-recall curves (area all, max 100 detections), one line per result and IoU.

    Args:
        files: one or several evaluation results (see :func:`load_eval_results`).
        naming_scheme: legend label for files: 'iter' (file stem, e.g. 'checkpoint0099') or 'exp_id'
            (the parent folder name); ignored when ``names`` is given.
        output: PNG path to write; None only returns the figure.
        ious: IoU thresholds to draw; None averages over all (the COCO AP curve).
        names: legend label per result.

    Returns:
        The matplotlib Figure (precision vs recall, with mean precision = AP in each legend entry).
    """
    sources = list(files) if isinstance(files, (list, tuple)) else [files]
    if not sources:
        raise ValueError("plot_precision_recall needs at least one evaluation result")
    if naming_scheme not in ("iter", "exp_id"):
        raise ValueError(f"naming_scheme must be 'iter' or 'exp_id', got {naming_scheme!r}")
    labels = list(names) if names else [_result_name(s, i, naming_scheme) for i, s in enumerate(sources)]
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    for index, (source, label) in enumerate(zip(sources, labels)):
        results = load_eval_results(source)
        for style, iou in zip(styles * len(ious), ious):
            curve = mean_precision_curve(results, iou=iou)
            ap = float(np.nanmean(curve)) if not np.all(np.isnan(curve)) else math.nan
            iou_text = "IoU .50:.95" if iou is None else f"IoU {iou:.2f}"
            ax.plot(results["rec_thrs"], curve, style, color=f"C{index % 10}", label=f"{label} {iou_text} AP={ap:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("precision-recall (area all, 100 detections)")
    if output is not None:
        _save(fig, output)
    return fig


def _result_name(source: Any, index: int, naming_scheme: str) -> str:
    if isinstance(source, (str, Path)):
        path = Path(source)
        return path.stem if naming_scheme == "iter" else path.resolve().parent.name
    return f"result {index}"
