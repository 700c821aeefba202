"""--config YAML files: precedence, _base_ chains, conversion, unknown keys, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli.config import ConfigError, apply_config, dump_config, is_explicit, load_config
from main import get_args_parser, parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_defaults_yaml_command_line(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "lr: 2e-4\nbatch_size: 4\nepochs: 7\nmasks: true\n")
    args = parse_args(["--config", str(cfg), "--batch_size", "8"])
    defaults = get_args_parser().parse_args([])
    assert args.batch_size == 8  # explicit flag beats YAML
    assert args.lr == 2e-4 and isinstance(args.lr, float)  # YAML reads 2e-4 as a string: converted
    assert args.epochs == 7 and args.masks is True  # YAML beats defaults
    assert args.weight_decay == defaults.weight_decay  # untouched keys keep the defaults
    assert is_explicit(args, "batch_size") and is_explicit(args, "lr") and not is_explicit(args, "device")


def test_explicit_flag_equal_to_default_still_wins(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "lr: 5.0e-4\ndevice: cpu\n")
    default_lr = get_args_parser().parse_args([]).lr
    args = parse_args(["--config", str(cfg), "--lr", str(default_lr)])
    assert args.lr == default_lr
    assert args.device == "cpu" and is_explicit(args, "device")


def test_store_false_flag_by_dest_name(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "aux_loss: false\n")
    assert parse_args(["--config", str(cfg)]).aux_loss is False


def test_base_chain_child_wins(tmp_path):
    _write(tmp_path / "base.yaml", "epochs: 10\nlr_drop: 8\nhidden_dim: 64\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = _write(sub / "child.yaml", "_base_: ../base.yaml\nepochs: 5\n")
    assert load_config(child) == {"epochs": 5, "lr_drop": 8, "hidden_dim": 64}
    args = parse_args(["--config", str(child), "--lr_drop", "3"])
    assert (args.epochs, args.lr_drop, args.hidden_dim) == (5, 3, 64)


@pytest.mark.parametrize(
    "text, message",
    [
        ("bath_size: 4\n", "unknown key 'bath_size'; did you mean 'batch_size'?"),
        ("zzz_qqq: 1\n", "unknown key 'zzz_qqq'"),
        ("amp: fp8\n", "amp: 'fp8' is not one of"),
        ("batch_size: 2.5\n", "batch_size must be an integer"),
        ("masks: 3\n", "masks must be true or false"),
        ("lr: abc\n", "cannot convert 'abc' to float"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("lr: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    cfg = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match="bad.yaml") as info:
        parse_args(["--config", str(cfg)])
    assert message in str(info.value)


def test_missing_and_circular_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_namespace_built_in_python_treats_changed_values_as_explicit(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "epochs: 9\nbatch_size: 6\n")
    parser = get_args_parser()
    args = parser.parse_args(["--batch_size", "3"])
    args.config = str(cfg)
    apply_config(args, parser)  # no argv: values differing from the defaults count as explicit
    assert (args.epochs, args.batch_size) == (9, 3)


def test_dumped_config_reads_back_identically(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "lr: 3.0e-4\nbackbone: resnet18\ndilation: true\n")
    args = parse_args(["--config", str(cfg), "--epochs", "4"])
    args.distributed = False  # a derived attribute main() adds: not a flag, must not be dumped
    dump_config(args, get_args_parser(), tmp_path / "resolved.yaml")
    dumped = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert "distributed" not in dumped and "config" not in dumped
    again = parse_args(["--config", str(tmp_path / "resolved.yaml")])
    for key, value in vars(args).items():
        if key not in ("config", "distributed") and not key.startswith("_"):  # private: what was explicit
            assert getattr(again, key) == value, key


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    args = parse_args(["--config", str(path)])
    assert args.config == str(path)
    assert set(load_config(path)) <= set(vars(args))


def test_published_recipes_match_the_paper():
    r50 = parse_args(["--config", str(CONFIGS[0].parent / "r50.yaml")])
    assert (r50.backbone, r50.epochs, r50.lr_drop, r50.lr, r50.lr_backbone) == ("resnet50", 500, 400, 1e-4, 1e-5)
    dc5 = parse_args(["--config", str(CONFIGS[0].parent / "r101_dc5.yaml")])
    assert (dc5.backbone, dc5.dilation, dc5.eval_batch_size) == ("resnet101", True, 1)
    pan = parse_args(["--config", str(CONFIGS[0].parent / "panoptic.yaml")])
    assert (pan.masks, pan.dataset_file, pan.epochs, pan.lr_drop) == (True, "coco_panoptic", 25, 15)
