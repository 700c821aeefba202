"""Crash-safe checkpoint files: atomic saving, safe loading, and finding the checkpoint to resume from.

A checkpoint is a dict with 'model' (state dict) and, for training, 'optimizer', 'lr_scheduler', 'epoch',
'args' (a plain dict) and optionally 'iteration', 'rng_state', 'scaler', 'run_id' (one id per run, kept by
resumes), 'class_names', ... Positions follow one convention:

- 'epoch': the last epoch fully completed (the published meaning: training resumes at epoch + 1; -1 when a
  mid-epoch checkpoint is written during the first epoch);
- 'iteration': batches of epoch 'epoch' + 1 already trained (absent or 0 at an epoch boundary). Mid-epoch
  checkpoints (--checkpoint_every) overwrite checkpoint.pth and carry iteration > 0.

`resume_position(ckpt)` turns that into (start_epoch, start_iteration).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pickle
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

logger = logging.getLogger(__name__)

# The only non-tensor globals a checkpoint may carry: published DETR checkpoints store the training
# command line as an argparse.Namespace under 'args'. Everything else is refused.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# Leaf types torch.load(weights_only=True) accepts without an allow-list (exact types: subclasses may not load).
_SAFE_LEAVES = frozenset(
    (str, bytes, int, float, bool, complex, type(None), torch.Tensor, torch.nn.Parameter)
    + (torch.Size, torch.dtype, torch.device)
)

_MAIN_NAME = "checkpoint.pth"
_NUMBERED = re.compile(r"^checkpoint(\d{4,})\.pth$")
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read safely: missing, truncated, corrupt, unsafe, unsaveable."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle references a global outside the allow-list (it could run code)."""


# --------------------------------------------------------------------------------------------- saving


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically, keeping the previous version as ``<name>.prev``.

    The data goes to a temporary file in the same folder (flushed and fsynced), the current file is
    hard-linked to ``<name>.prev``, then the temporary file replaces ``path`` and the folder is fsynced.
    A kill at any moment leaves ``path`` either fully old or fully new, never truncated.

    Args:
        obj: checkpoint dict; an argparse.Namespace under 'args' is stored as a plain dict so the file
            loads with ``torch.load(weights_only=True)``.
        path: destination file.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(obj.get("args"), argparse.Namespace):
        obj = {**obj, "args": vars(obj["args"]).copy()}
    check_weights_only_safe(obj)
    _remove_stale_temporaries(path)
    # open(..., "xb") rather than mkstemp: the file gets the umask's permissions (mkstemp forces 0600).
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        os_error = _os_error_in(e)
        if os_error is None:
            raise
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint was there"
        raise CheckpointError(
            f"saving checkpoint {path} failed ({_first_line(os_error)}); {kept}; free disk space or pass another "
            "--output_dir, then continue with --resume auto"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or the cause/context of torch.save's RuntimeError (a full disk
    surfaces as "[enforce fail at inline_container.cc] ... unexpected pos" raised while handling Errno 28)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def check_weights_only_safe(obj: Any, where: str = "checkpoint") -> None:
    """Raise CheckpointError if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse.

    Checked before writing, so a bad entry fails the first save instead of making every later resume fail.
    Allowed: tensors (and nn.Parameter), torch.Size/dtype/device, str, bytes, int, float, bool, complex,
    None, and dict/OrderedDict/list/tuple/set of those.
    """
    stack = [(obj, where)]
    while stack:
        value, name = stack.pop()
        kind = type(value)
        if kind in _SAFE_LEAVES:
            continue
        if kind in (dict, collections.OrderedDict):
            for key, item in value.items():
                stack.append((key, f"{name} key {key!r}"))
                stack.append((item, f"{name}[{key!r}]"))
        elif kind in (list, tuple, set):
            stack.extend((item, f"{name}[{i}]") for i, item in enumerate(value))
        else:
            raise CheckpointError(
                f"cannot save {name}: a {kind.__module__}.{kind.__qualname__} would make the checkpoint "
                "unloadable with weights_only=True; convert it to a tensor or a plain int/float/str/list/dict"
            )


def _keep_previous(path: Path) -> None:
    """Make ``<path>.prev`` a copy of ``path`` without ever leaving ``path`` missing."""
    prev = path.with_name(path.name + ".prev")
    if prev.exists() and os.path.samefile(path, prev):
        # A save killed between linking and replacing left both names on one file. Renaming a third link onto
        # it would be a no-op (POSIX rename of two links to one inode) and leave the temporary link behind.
        return
    link = path.with_name(f".{path.name}.prev.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links on this filesystem: fall back to a full copy
        _copy_synced(path, link)
    os.replace(link, prev)


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 24):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files left by a save that was killed (only one writer per path is expected)."""
    prefix = f".{path.name}."
    for stale in path.parent.iterdir():
        if stale.name.startswith(prefix) and stale.name.endswith(".tmp"):
            stale.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- loading


def load_checkpoint(
    path_or_url: str | os.PathLike, map_location: Any = "cpu", check_hash: bool = False, hint: str = "check the path"
) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``; only argparse.Namespace is allowed besides.

    Args:
        path_or_url: local file, or an http(s) URL downloaded (atomically) into ``<torch hub dir>/checkpoints``
            and read from there on later calls.
        map_location: as for ``torch.load``.
        check_hash: for URLs, verify the sha256 prefix carried in the file name (``name-<hex>.pth``).
        hint: what the missing-file error suggests (the caller knows its flag, e.g. "--resume auto").

    Returns:
        The checkpoint dict, 'args' left as stored (a dict for this project's files, an argparse.Namespace
        for published ones; see `checkpoint_args_to_namespace`).

    Raises:
        CheckpointError: missing, truncated or corrupt file, or not a dict.
        UnsafeCheckpointError: the file pickles an object outside the allow-list.
    """
    source = str(path_or_url)
    path = download_checkpoint(source, check_hash=check_hash) if _is_url(source) else Path(source)
    if path.is_dir():
        found = [p.name for p in resume_candidates(path)]
        example = path / (found[0] if found else _MAIN_NAME)
        raise CheckpointError(
            f"checkpoint {path} is a folder ({'holding ' + ', '.join(found) if found else 'no checkpoint in it'}); "
            f"pass a file such as {example}, or --resume auto --output_dir {path} for its newest checkpoint"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file; {hint}")
    return _safe_load(path, map_location)


def _safe_load(path: Path, map_location: Any, mmap: bool = False) -> dict:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        match = _UNSAFE_GLOBAL.search(str(e))
        if match is None:
            raise CheckpointError(f"checkpoint {path}: corrupt pickle data ({_first_line(e)})") from None
        raise UnsafeCheckpointError(
            f"checkpoint {path} refused: it pickles '{match.group(1)}', which could run code when loaded; "
            "only tensors, plain containers and argparse.Namespace are allowed. If you trust the file, re-save "
            "its tensors with torch.save({'model': torch.load(f, weights_only=False)['model']}, new_file)"
        ) from None
    except Exception as e:  # noqa: BLE001 - junk bytes surface as struct.error, IndexError, ... from the unpickler
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); use another copy (e.g. its .prev)"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return obj


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    text = lines[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text[:150]}"


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def download_checkpoint(url: str, check_hash: bool = False) -> Path:
    """Download ``url`` into ``<torch hub dir>/checkpoints`` unless already there; return the local path.

    torch.hub writes to a temporary file and renames it, so an interrupted download leaves nothing behind.
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f"checkpoint URL {url} has no file name; point it at a .pth file")
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / name
    if not dst.is_file():
        hash_prefix = None
        if check_hash:
            match = torch.hub.HASH_REGEX.search(name)
            hash_prefix = match.group(1) if match else None
        logger.info("downloading %s to %s", url, dst)
        try:
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_prefix, progress=False)
        except Exception as e:
            raise CheckpointError(f"checkpoint URL {url}: download failed ({_first_line(e)})") from None
    return dst


def inference_weights(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The state dict to evaluate or predict with: ``ema.module`` (the EMA weights, which a run with --ema_decay
    evaluates, and the published RT-DETR ``.pth`` layout ``{'ema': {'module': sd, 'updates': n}}``) when present,
    else ``model``; None when the checkpoint holds neither."""
    ema = checkpoint.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
        return ema["module"]
    state = checkpoint.get("model")
    return state if isinstance(state, Mapping) else None


def checkpoint_args_to_namespace(args: dict | argparse.Namespace | None) -> argparse.Namespace | None:
    """The 'args' entry of a checkpoint (plain dict here, Namespace in published files) as a Namespace."""
    if args is None or isinstance(args, argparse.Namespace):
        return args
    if isinstance(args, dict):
        return argparse.Namespace(**args)
    raise CheckpointError(f"checkpoint 'args' must be a dict or argparse.Namespace, found {type(args).__name__}")


# --------------------------------------------------------------------------------------------- resuming


def resume_position(ckpt: dict) -> tuple[int, int]:
    """(start_epoch, start_iteration) to continue from ``ckpt`` (see the module docstring)."""
    return int(ckpt.get("epoch", -1)) + 1, int(ckpt.get("iteration") or 0)


def resume_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of ``output_dir`` that --resume auto considers (unordered)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    names = [_MAIN_NAME, _MAIN_NAME + ".prev"]
    names += sorted(p.name for p in folder.iterdir() if _NUMBERED.match(p.name))
    return [folder / n for n in names if (folder / n).is_file()]


def load_latest_checkpoint(output_dir: str | os.PathLike, map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """Load the most advanced readable checkpoint of ``output_dir``; unreadable ones are skipped with a warning.

    "Most advanced" is the largest `resume_position` (ties: checkpoint.pth, then the newest file) among the
    checkpoints of the latest run: those sharing checkpoint.pth's 'run_id' (files without one form one group).

    Returns:
        (path, checkpoint dict), or None when ``output_dir`` holds no readable checkpoint.
    """
    heads = []
    for path in resume_candidates(output_dir):
        try:  # cheap look at the positions: tensors are memory-mapped, not read
            head = _safe_load(path, "cpu", mmap=True)
        except CheckpointError:
            try:
                head = _safe_load(path, "cpu")
            except CheckpointError as e:
                logger.warning("--resume auto: skipping %s", e)
                continue
        heads.append((path, head.get("run_id"), resume_position(head), path.stat().st_mtime))
        del head
    if not heads:
        return None
    # Only the run that wrote the newest file counts (a folder reused by another run can still hold older
    # files of the first one, e.g. its checkpoint0006.pth): checkpoint.pth is always the last one written.
    newest = max(heads, key=lambda h: (h[0].name == _MAIN_NAME, h[3]))
    ranked = [((pos, path.name == _MAIN_NAME, mtime), path) for path, run, pos, mtime in heads if run == newest[1]]
    for _, path in sorted(ranked, key=lambda item: item[0], reverse=True):
        try:
            return path, _safe_load(path, map_location)
        except CheckpointError as e:
            logger.warning("--resume auto: skipping %s", e)
    return None


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Path of the checkpoint that --resume auto continues from (see `load_latest_checkpoint`), or None."""
    found = load_latest_checkpoint(output_dir)
    return None if found is None else found[0]
