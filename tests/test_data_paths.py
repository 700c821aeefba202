"""Which data a run trains on: the user's paths always win over the generated dataset (issue 15, items 1-2)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_coco_dataset import ann, write_coco

import datasets
import main as main_module
from cli.arguments import get_args_parser
from datasets.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]
SMALL_SYNTHETIC = ["--synthetic_train_size", "2", "--synthetic_val_size", "2"]


def _custom_data(tmp_path):
    train_ann = write_coco(tmp_path, "train", annotations=[ann(1, [1, 1, 5, 5])])
    return tmp_path / "train2017", train_ann


def test_command_line_coco_path_beats_the_yaml_synthetic_dataset(tmp_path):
    write_coco(tmp_path, "train")
    args = main_module.parse_args(["--config", str(main_module.DEMO_CONFIG), "--coco_path", str(tmp_path)])
    assert args.dataset_file == "coco"
    assert datasets.coco.coco_paths("train", datasets.data_settings(args)) == (
        tmp_path / "train2017",
        tmp_path / "annotations" / "instances_train2017.json",
    )


def test_synthetic_with_a_data_path_is_an_error_not_a_silent_choice(tmp_path):
    args = get_args_parser().parse_args(
        ["--dataset_file", "synthetic", "--coco_path", str(tmp_path), "--synthetic_dir", str(tmp_path / "syn")]
    )
    with pytest.raises(DatasetError, match="--dataset_file synthetic .* --coco_path"):
        datasets.build_dataset("train", args)
    assert not (tmp_path / "syn").exists()


def test_train_folders_without_val_folders_do_not_fall_back_to_generated_data(tmp_path):
    img_folder, ann_file = _custom_data(tmp_path)
    flags = ["--train_img_folder", str(img_folder), "--train_ann_file", str(ann_file), "--num_classes", "13"]
    args = get_args_parser().parse_args([*flags, "--synthetic_dir", str(tmp_path / "syn"), *SMALL_SYNTHETIC])
    assert len(datasets.build_dataset("train", args)) == 1
    with pytest.raises(DatasetError, match="without validation data: pass --val_img_folder and --val_ann_file"):
        datasets.build_dataset("val", args)
    assert not (tmp_path / "syn").exists()


def test_coco_path_naming_a_file_says_so(tmp_path):
    _, ann_file = _custom_data(tmp_path)
    args = get_args_parser().parse_args(["--coco_path", str(ann_file)])
    with pytest.raises(DatasetError, match=r"--coco_path .*instances_train2017\.json is a file") as err:
        datasets.build_dataset("train", args)
    assert "json/train2017" not in str(err.value)


def _stage1_command(text: str, marker: str) -> list[str]:
    lines = text[text.index(marker) :].splitlines()[1:]
    command = ""
    for line in lines:
        command += line.lstrip("#").strip().rstrip("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(command)
    assert words[:2] == ["python", "main.py"], words
    return words[2:]


@pytest.mark.parametrize(
    "path, marker", [("README.md", "# stage 1"), ("configs/panoptic.yaml", "Stage 1 trains that detector")]
)
def test_documented_panoptic_stage1_trains_the_250_panoptic_classes(path, marker):
    """Issue 15: without --dataset_file coco_panoptic, stage 2 failed on class_embed [14, 64] vs [251, 64]."""
    args = main_module.parse_args(_stage1_command((ROOT / path).read_text(), marker))
    assert args.dataset_file == "coco_panoptic" and args.coco_panoptic_path
    assert datasets.num_classes_for(args) == 250
