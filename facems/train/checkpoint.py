"""Atomic checkpoint files and a manager that finds the newest one that loads.

Writing (:func:`atomic_save`): the object is ``torch.save``-d to ``.{name}.tmp-<pid>`` in the target's
folder, flushed and ``fsync``-ed, renamed onto the target with :func:`os.replace` (atomic on POSIX and
Windows), and the folder is ``fsync``-ed so the rename survives a power cut. If anything fails before
the rename (disk full, I/O error, a bad object), the temporary file is removed and whatever was at the
target stays as it was; a reader never sees a half-written file under the target's name.

Layout written by :class:`CheckpointManager` in its folder::

    checkpoint_00001000.pt   one file per saved step, the newest ``keep`` are kept
    checkpoint_00002000.pt
    checkpoint_last.pt       the newest save, a hard link to its step file (a copy where the file
                             system has no hard links), swapped in atomically
    model.pt                 (:func:`save_model_pt`) the backbone state_dict alone, as insightface's
                             arcface_torch writes it

``checkpoint_last.pt`` is made as a link (or copy) under a temporary name and then renamed onto
``checkpoint_last.pt``, only after its step file is complete and synced, so it never names a
half-written file. A hard link costs no space and no second write; the fallback to older step files
in :meth:`CheckpointManager.load_latest` gives the redundancy a copy would.

Reading: the zip members' CRC-32 checksums (written by ``torch.save``) are verified first, because
``torch.load`` does not check them and would return silently wrong tensors from a file with flipped
bytes; this reads the file once more. Then ``torch.load(..., weights_only=True)``, which refuses pickled code (``__reduce__``
payloads) instead of running it. Because of that, :meth:`CheckpointManager.save` and
:func:`save_model_pt` check before writing that the state holds only types such a load accepts
(tensors, dicts, lists, tuples, sets, ints, floats, complex, str, bytes, bool, None, ``torch.dtype``,
``torch.device``, ``torch.Size``) and name the offending key otherwise, e.g. a ``numpy.float64``
metric or a config dataclass (store ``dataclasses.asdict(cfg)``), so that a run does not discover at
resume time that its checkpoints cannot be read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch

from facems.fileio import atomic_write, fsync_dir, temp_path

__all__ = ["CheckpointError", "CheckpointManager", "atomic_save", "load_checkpoint", "save_model_pt"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

LAST_NAME = "checkpoint_last.pt"
_STEP_RE = re.compile(r"^checkpoint_(\d+)\.pt$")

# Exact types (not subclasses: numpy.float64 is a float subclass that weights_only refuses).
_LEAF_TYPES = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """Checkpoint files exist but none of them loads, or a state cannot be stored loadably."""


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` holds either its old content or all of the new.

    Args:
        obj: anything ``torch.save`` accepts.
        path: destination file; its folder must exist.

    Raises:
        OSError: writing, syncing or renaming failed (e.g. ``ENOSPC``); the temporary file
            ``.{name}.tmp-<pid>`` has been removed and ``path`` is untouched. A failure of the final
            folder ``fsync`` happens after the rename: ``path`` then holds the new content.
        Exception: whatever ``torch.save`` raises for an object it cannot serialise, with the same
            clean-up.
    """
    with atomic_write(path) as f:
        torch.save(obj, f)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise :class:`CheckpointError` naming the first value ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        return
    if kind in _LEAF_TYPES:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            _check_loadable(key, f"{where} key {key!r}")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set, frozenset):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    name = f"{kind.__module__}.{kind.__qualname__}"
    raise CheckpointError(
        f"{where}: {name} cannot be loaded back with torch.load(weights_only=True); "
        "store tensors, plain containers and Python scalars (e.g. float(x), tensor.tolist(), dataclasses.asdict(cfg))"
    )


def save_model_pt(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Write a backbone's state_dict alone (``model.pt``), atomically, as arcface_torch does.

    Tensors are detached and moved to the CPU, so the file loads on a machine without a GPU and without
    ``map_location``; keys are kept as given.

    Args:
        state_dict: ``model.state_dict()`` of the bare backbone (``ddp_model.module.state_dict()`` under
            DDP): parameter/buffer name -> tensor.
        path: destination file, conventionally ``<work_dir>/model.pt``.

    Raises:
        CheckpointError: a key is not a str, a value is not a tensor, or the keys carry DDP's
            ``module.`` prefix (insightface loads ``model.pt`` into the bare backbone).
        OSError: writing failed; ``path`` is untouched (see :func:`atomic_save`).
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state_dict key {key!r} is a {type(key).__name__}, expected str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state_dict[{key!r}] is a {type(value).__name__}, expected a tensor"
            )
        out[key] = value.detach().cpu()
    if out and all(key.startswith("module.") for key in out):
        raise CheckpointError(
            f"{path}: every state_dict key starts with 'module.' (a DDP wrapper's state_dict); "
            "pass the bare backbone's, model.module.state_dict()"
        )
    atomic_save(out, path)


class CheckpointManager:
    """Save numbered training checkpoints atomically, keep the newest few, and load the newest that loads.

    Args:
        directory: folder for the checkpoint files; created if missing.
        keep: how many step files to keep (>= 1). The file just written is always kept, even if older
            step numbers exceed it (a run resumed from an earlier checkpoint).

    Example:
        >>> manager = CheckpointManager(work_dir / "checkpoints", keep=2)
        >>> found = manager.load_latest()
        >>> if found is not None:
        ...     state, path = found
        >>> manager.save({"model": model.state_dict(), "step": step, ...}, step)
    """

    def __init__(self, directory: PathLike, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"CheckpointManager keep: expected an int >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def last_path(self) -> Path:
        """``<directory>/checkpoint_last.pt``."""
        return self.directory / LAST_NAME

    def step_path(self, step: int) -> Path:
        """``<directory>/checkpoint_{step:08d}.pt``."""
        return self.directory / f"checkpoint_{step:08d}.pt"

    def step_files(self) -> list[tuple[int, Path]]:
        """The step files present, as ``(step, path)`` sorted by step, newest last."""
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_RE.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as ``checkpoint_{step:08d}.pt``, point ``checkpoint_last.pt`` at it, prune.

        Args:
            state: everything needed to resume (model, optimizer, scheduler, scaler state_dicts, sampler
                position, :func:`facems.train.rng.capture_rng_state`, config as a dict, ...). Only types
                that ``torch.load(weights_only=True)`` accepts are allowed.
            step: global optimisation step (>= 0), used in the file name.

        Returns:
            The path of the step file written.

        Raises:
            CheckpointError: ``state`` holds a value that could not be loaded back; nothing is written.
            OSError: writing failed; the previous checkpoints and ``checkpoint_last.pt`` are untouched.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CheckpointManager.save step: expected an int >= 0, got {step!r}")
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint state: expected a dict, got {type(state).__name__}")
        _check_loadable(state, "checkpoint state")
        path = self.step_path(step)
        atomic_save(state, path)
        self._point_last_at(path)
        self._prune(keep_also=path)
        logger.info("saved checkpoint %s", path)
        return path

    def _point_last_at(self, path: Path) -> None:
        last = self.last_path
        tmp = temp_path(last)
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a killed process with our pid
            try:
                os.link(path, tmp)
            except OSError:
                # No hard links on this file system: a full, synced copy instead.
                shutil.copyfile(path, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, last)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(self.directory)

    def _prune(self, keep_also: Path) -> None:
        files = self.step_files()
        keep = {p for _, p in files[-self.keep :]} | {keep_also}
        for _, p in files:
            if p not in keep:
                try:
                    p.unlink()
                    logger.info("removed old checkpoint %s", p)
                except OSError as e:
                    logger.warning("could not remove old checkpoint %s: %s", p, e)

    def load_latest(self, map_location: Any = "cpu") -> tuple[dict[str, Any], Path] | None:
        """Load the newest checkpoint that loads.

        Tries the step files from the highest step down, then ``checkpoint_last.pt`` (normally a hard
        link to the newest step file; alone it covers a folder holding only that file), each with
        ``torch.load(path, map_location=map_location, weights_only=True)``. A file that fails (truncated,
        corrupted, holds pickled code, or holds something other than a dict) is skipped with a logged
        warning naming it and the reason. A file that is the same file (hard link) as one that already
        failed is skipped without reading it again. If a process died between writing a step file and
        swapping ``checkpoint_last.pt``, that complete newest step file is still the one loaded.

        Args:
            map_location: passed to ``torch.load`` (``"cpu"``, a ``torch.device``, a dict, ...).

        Returns:
            ``(state, path)`` with the path of the file loaded (possibly ``checkpoint_last.pt``), or
            ``None`` when the folder holds no checkpoint file.

        Raises:
            CheckpointError: checkpoint files exist but none loads; the message lists each with its reason.
        """
        candidates = [p for _, p in reversed(self.step_files())]
        if self.last_path.is_file():
            candidates.append(self.last_path)
        if not candidates:
            return None
        failures: list[str] = []
        failed_ids: dict[tuple[int, int], Path] = {}
        for path in candidates:
            try:
                st = path.stat()
                file_id = (st.st_dev, st.st_ino)
            except OSError as e:
                reason = f"cannot stat: {e}"
            else:
                if file_id in failed_ids:
                    reason = f"same file as {failed_ids[file_id].name}, which failed"
                else:
                    state, reason = _try_load(path, map_location)
                    if state is not None:
                        return state, path
                    failed_ids[file_id] = path
            logger.warning("skipping checkpoint %s: %s", path, reason)
            failures.append(f"{path}: {reason}")
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be loaded:\n  " + "\n  ".join(failures)
        )


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load one checkpoint file with the checks of :meth:`CheckpointManager.load_latest` (CRC, weights_only).

    Raises:
        CheckpointError: the file is missing or does not load; the message names it and says why.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    state, reason = _try_load(p, map_location)
    if state is None:
        raise CheckpointError(f"{p}: cannot load: {reason}")
    return state


def _try_load(path: Path, map_location: Any) -> tuple[dict[str, Any] | None, str]:
    """``(state, "")`` when ``path`` loads as a dict with weights_only, else ``(None, why it failed)``."""
    try:
        # torch.load does not check the zip members' CRC-32: a flipped bit in tensor data would load as
        # a silently wrong weight. zipfile's testzip reads every member and compares its CRC.
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
            if bad_member is not None:
                return None, f"CRC-32 mismatch in archive member {bad_member!r} (corrupted bytes)"
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any failure of an untrusted file means "not loadable"
        return None, f"{type(e).__name__}: {_summary(str(e))}"
    if not isinstance(obj, dict):
        return None, f"expected a dict, got {type(obj).__name__}"
    return obj, ""


def _summary(message: str, limit: int = 300) -> str:
    """The informative line of a load error: torch's weights_only refusal names the global on its own line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    line = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])
    return line if len(line) <= limit else line[:limit] + "..."
