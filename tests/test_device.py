"""--device: the default 'cuda' falls back to MPS/CPU with one warning; an explicit missing device is an error."""

from __future__ import annotations

import logging

import pytest
import torch

from cli.config import apply_config, is_explicit
from main import get_args_parser, parse_args
from run import distributed as dist_utils


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_utils, "_mps_available", lambda: False)


def _select(args) -> torch.device:
    return dist_utils.select_device(args.device, is_explicit(args, "device"))


def test_default_cuda_falls_back_to_cpu_with_one_warning(no_accelerator, caplog):
    args = parse_args([])
    assert args.device == "cuda" and not is_explicit(args, "device")
    with caplog.at_level(logging.WARNING, logger="detr"):
        device = _select(args)
    assert device == torch.device("cpu")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CUDA is not available" in warnings[0].getMessage()


def test_fallback_prefers_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_utils, "_mps_available", lambda: True)
    assert _select(parse_args([])) == torch.device("mps")


def test_explicit_cuda_without_cuda_is_an_error(no_accelerator):
    with pytest.raises(dist_utils.DeviceError, match="--device cuda was requested but CUDA is not available"):
        _select(parse_args(["--device", "cuda"]))


def test_cuda_from_config_file_counts_as_explicit(no_accelerator, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cuda\n")
    with pytest.raises(dist_utils.DeviceError):
        _select(parse_args(["--config", str(cfg)]))


def test_namespace_without_argv_falls_back(no_accelerator):
    args = get_args_parser().parse_args([])
    apply_config(args, get_args_parser())
    assert _select(args) == torch.device("cpu")


def test_explicit_mps_without_mps_is_an_error(no_accelerator):
    with pytest.raises(dist_utils.DeviceError, match="mps"):
        _select(parse_args(["--device", "mps"]))


def test_cpu_is_always_available(no_accelerator, caplog):
    with caplog.at_level(logging.WARNING, logger="detr"):
        assert _select(parse_args(["--device", "cpu"])) == torch.device("cpu")
    assert not caplog.records


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_picks_the_local_rank_gpu():
    device = dist_utils.select_device("cuda", explicit=True, local_rank=0)
    assert device.type == "cuda" and device.index == 0
