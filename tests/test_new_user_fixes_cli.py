"""Issue 18, the command-line items: family flags given to the wrong family, an evaluation that rewrote the run's
config.yaml, AP on a capped evaluation, --no_progress silence, CPU threads, --backbone_stages / DINO --two_stage
messages, hub load wording, one-epoch plots, and the --help header."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_FLAGS, parse_tiny_args
from test_main_e2e import DATA_FLAGS, _args

import engine
import main as main_module
import util.threads
from cli.arguments import check_family_flags, family_only_flags, get_args_parser
from cli.config import command_line_dests, dump_config, explicit_of
from models import FAMILIES
from run.checkpoint import CheckpointError
from util.logging import read_log

ROOT = Path(__file__).resolve().parents[1]
# The published DINO 5-scale command line, without its --model dino.
DINO_5SCALE = ["--num_feature_levels", "5", "--return_interm_indices", "0", "1", "2", "3", "--dn_number", "100"]


def _cli_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main_module.cli(argv)
    return str(exit_info.value.code)


# ------------------------------------------------------------------------------- 1: family flags


def test_the_dino_5scale_command_line_without_model_dino_is_one_line_naming_the_flag(tmp_path):
    message = _cli_error([*TINY_FLAGS, *DINO_5SCALE, "--synthetic_dir", str(tmp_path / "data"), *DATA_FLAGS])
    # Every family reading the flag is named; the suggestion is a family reading all three flags given.
    assert message.startswith("error: --num_feature_levels is a Deformable DETR / DINO")
    assert "flag: add --model dino" in message and "\n" not in message
    assert message.endswith(
        "(--model is detr, which ignores --num_feature_levels, --return_interm_indices, --dn_number)"
    )
    assert not (tmp_path / "data").exists()  # refused before generating or reading any data


@pytest.mark.parametrize(
    "family, flags, first, suggestion",
    [
        ("deformable_detr", ["--return_interm_indices", "0", "1", "2", "3"], "--return_interm_indices", "--model dino"),
        ("deformable_detr", ["--dn_number", "4"], "--dn_number", "--model dino"),
        ("detr", ["--enc_n_points", "2"], "--enc_n_points", "--model deformable_detr or --model dino"),
        ("detr", ["--two_stage"], "--two_stage", "--model deformable_detr"),
        ("dino", ["--two_stage"], "--two_stage", "DINO is always two-stage"),
    ],
)
def test_a_flag_another_family_reads_is_refused(tmp_path, family, flags, first, suggestion):
    message = _cli_error(["--model", family, *TINY_FLAGS, *flags, "--synthetic_dir", str(tmp_path), *DATA_FLAGS])
    assert message.startswith(f"error: {first} is a ") and suggestion in message and "\n" not in message


def test_the_family_flag_table_names_real_flags_and_families():
    dests = {a.dest for a in get_args_parser()._actions}
    table = family_only_flags()
    assert {"num_feature_levels", "with_box_refine", "dn_number", "return_interm_indices"} <= set(table)
    for dest, families in table.items():
        assert dest in dests and families and set(families) < set(FAMILIES), dest
    # Published DETR flags stay accepted by every family.
    for published in ("eos_coef", "aux_loss", "masks", "dilation", "pre_norm", "set_cost_class", "lr_drop"):
        assert published not in table


def test_a_yaml_family_flag_is_refused_but_a_dumped_detr_config_loads(tmp_path):
    parser = get_args_parser()
    (tmp_path / "bad.yaml").write_text("num_feature_levels: 5\n")
    with pytest.raises(ValueError, match=r"^--num_feature_levels is a Deformable DETR / DINO"):
        main_module.parse_args(["--config", str(tmp_path / "bad.yaml")])

    # A DETR run's config.yaml lists every flag, the DINO ones at their defaults: it must load as it is.
    dump_config(parser.parse_args([]), parser, tmp_path / "config.yaml")
    assert "dn_number" in yaml.safe_load((tmp_path / "config.yaml").read_text())
    args = main_module.parse_args(["--config", str(tmp_path / "config.yaml")])
    check_family_flags(args, command_line_dests(args), explicit_of(args))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_family_flag_check(path):
    args = main_module.parse_args(["--config", str(path)])
    check_family_flags(args, command_line_dests(args), explicit_of(args))


def test_resume_adopting_a_dino_checkpoint_accepts_dino_flags(tmp_path):
    """No --model: the checkpoint's family (dino) is built, so --dn_number is not refused (the load fails later)."""
    path = tmp_path / "dino.pth"
    torch.save({"args": {"model": "dino"}, "model": {"transformer.level_embed": torch.zeros(1)}}, path)
    args = main_module.parse_args([*TINY_FLAGS, "--dn_number", "4", "--resume", str(path), "--lr_backbone", "1e-5",
                                   "--synthetic_dir", str(tmp_path / "data"), *DATA_FLAGS])  # fmt: skip
    with pytest.raises(CheckpointError):
        main_module.main(args)
    assert args.model == "dino"


# ------------------------------------------------------------------------------- 2, 3, 11, 12: through main


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory):
    """One epoch (2 iterations) on 4 generated images, evaluation capped at 2 of 3 validation images, --threads 2,
    --no_progress with a progress line after every iteration: (data, out, log lines, threads seen in training)."""
    base = tmp_path_factory.mktemp("capped")
    data, out = base / "data", base / "run"
    lines, threads_seen = _Lines(), []
    real_train = engine.train_one_epoch

    def recording_train(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    logger = logging.getLogger("detr")
    logger.addHandler(lines)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "PROGRESS_LOG_SECONDS", 0.0)
            patch.setattr(engine, "train_one_epoch", recording_train)
            args = _args(data, out, "--epochs", "1", "--synthetic_val_size", "3", "--eval_batch_size", "1",
                         "--max_iters_per_epoch", "2", "--threads", "2")  # fmt: skip
            main_module.main(args)
    finally:
        logger.removeHandler(lines)
    yield data, out, lines.lines, threads_seen
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_a_capped_evaluation_says_on_how_many_images(capped_run):
    _, out, lines, _ = capped_run
    final = [line for line in lines if line.startswith("final COCO AP")]
    assert len(final) == 1 and final[0].startswith("final COCO AP (IoU 0.50:0.95) on 2 of 3 validation images")
    assert "on the validation set" not in final[0]
    (record,) = read_log(out / "log.txt")
    assert (record["test_eval_images"], record["test_eval_images_total"]) == (2, 3)
    (action,) = [a for a in get_args_parser()._actions if a.dest == "max_iters_per_epoch"]
    assert "evaluation" in action.help and "subset" in action.help


@pytest.mark.slow
def test_no_progress_logs_a_line_per_interval_and_at_the_end(capped_run):
    _, _, lines, _ = capped_run
    train = [line for line in lines if line.startswith("epoch 0: ") and "iterations" in line]
    assert [line.split(" iterations")[0] for line in train] == ["epoch 0: 1/2", "epoch 0: 2/2"]
    assert "loss " in train[0] and "s/it" in train[0]
    assert [line.split(" iterations")[0] for line in lines if line.startswith("evaluation:")] == [
        "evaluation: 1/2", "evaluation: 2/2"]  # fmt: skip


@pytest.mark.slow
def test_the_start_up_line_shows_the_threads_and_they_apply(capped_run):
    _, _, lines, threads_seen = capped_run
    assert lines[0] == "device cpu, 2 intra-op CPU threads (--threads)"
    assert threads_seen == [2]
    assert torch.get_num_threads() == 1  # main() gives the caller its own setting back (conftest: 1)


@pytest.mark.slow
def test_an_evaluation_into_the_run_folder_keeps_its_config_yaml(capped_run):
    data, out, _, _ = capped_run
    before = (out / "config.yaml").read_bytes()
    stats = main_module.main(_args(data, out, "--eval", "--resume", str(out / "checkpoint.pth"),
                                   "--synthetic_val_size", "3"))  # fmt: skip
    assert (out / "config.yaml").read_bytes() == before
    assert yaml.safe_load(before)["eval"] is False
    assert yaml.safe_load((out / "eval_config.yaml").read_text())["eval"] is True
    # Uncapped: every validation image.
    assert (stats["eval_images"], stats["eval_images_total"]) == (3, 3)


def test_auto_threads_leave_the_data_workers_their_cores(monkeypatch):
    from util.threads import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(util.threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert choose_threads(None, "cpu", 2) == (6, "auto: 8 usable cores, 2 data workers")
    assert choose_threads(None, "cpu", 10)[0] == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose_threads(None, "cpu", 2)[0] == 2  # 8 cores / 2 processes - 2 workers
    assert choose_threads(None, "cuda", 0) == (16, "torch default")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(None, "cpu", 0) == (16, "OMP_NUM_THREADS")  # torch read it at start-up
    assert choose_threads(5, "cpu", 0) == (5, "--threads")
    with pytest.raises(ValueError, match="--threads 0"):
        choose_threads(0, "cpu", 0)


# ------------------------------------------------------------------------------- 9: messages


def test_backbone_stages_errors_name_backbone_stages_and_deformable_builds_with_three():
    from models import build_model

    for stages in ("2", "3"):
        args = parse_tiny_args("--model", "dino", "--backbone_stages", stages, "--num_classes", "3")
        with pytest.raises(ValueError, match=rf"^--backbone_stages {stages} keeps ResNet stages 0..") as info:
            build_model(args)
        assert "--masks" not in str(info.value) and "--return_interm_indices [1, 2, 3]" in str(info.value)
    # Deformable DETR keeps the C3-C4 a 3-stage ResNet has (plus extra levels): it builds and runs.
    model, _, _ = build_model(parse_tiny_args("--model", "deformable_detr", "--backbone_stages", "3",
                                              "--num_classes", "3"))  # fmt: skip
    out = model.eval()([torch.rand(3, 128, 128)])
    assert out["pred_boxes"].shape == (1, 10, 4)
    assert model.backbone[0].body.return_layers == {"layer2": "0", "layer3": "1"}


def test_dino_two_stage_says_dino_is_always_two_stage():
    for flag, text in (("--two_stage", "always two-stage"), ("--with_box_refine", "always refines boxes")):
        with pytest.raises(ValueError) as info:  # refused while parsing: Family.refused_flags of DINO
            main_module.parse_args([*TINY_FLAGS, "--model", "dino", flag, "--num_classes", "3"])
        assert text in str(info.value) and "needs --with_box_refine" not in str(info.value)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- 13: smaller


def test_a_hub_checkpoint_load_is_not_called_fine_tuning(tmp_path, capsys):
    import hubconf

    tiny = dict(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32,
                num_queries=5, enc_n_points=1, dec_n_points=1, num_classes=3)  # fmt: skip
    path = tmp_path / "mine.pth"
    torch.save({"model": hubconf.deformable_detr_resnet50(**tiny).state_dict()}, path)
    capsys.readouterr()
    hubconf.deformable_detr_resnet50(checkpoint=str(path), **tiny)
    printed = capsys.readouterr().out
    assert printed.startswith(f"weights from {path}: loaded ") and "fine-tuning" not in printed


def test_a_one_epoch_curve_has_markers(tmp_path):
    from util.plot_utils import plot_logs

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "log.txt").write_text('{"epoch": 0, "train_loss": 1.5, "test_loss": 1.7}\n')
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "log.txt").write_text("".join(f'{{"epoch": {e}, "train_loss": {1 / (e + 1)}}}\n'
                                                       for e in range(50)))  # fmt: skip
    fig = plot_logs([tmp_path / "one", tmp_path / "long"], fields=["loss"])
    one_train, one_test, long_train = fig.axes[0].lines
    assert one_train.get_marker() == "o" and one_test.get_marker() == "o"
    assert len(long_train.get_xdata()) == 50 and long_train.get_marker() in (None, "None", "")


def test_help_names_the_program_and_its_families():
    import tools.plot_logs

    parser = get_args_parser()
    assert parser.format_usage().startswith("usage: main.py ")
    assert "DETR, Deformable DETR and DINO" in parser.format_help().split("options:")[0]
    assert tools.plot_logs.get_args_parser().format_usage().startswith("usage: tools/plot_logs.py ")
