"""Checkpoint faults during training: a damaged newest checkpoint, a disk that fills during a save.

The guarantee checked end to end: a run loses at most the steps since the newest checkpoint that
loads. The reference is a straight run with the same seed; the faulty run, resumed, must end with
bit-identical parameters.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from facems.config import load_config
from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_train_pack
from facems.testing import tiny_run_overrides
from facems.train.checkpoint import CheckpointError, CheckpointManager
from facems.train.distributed import init_distributed
from facems.train.loop import Trainer


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint_pack")
    write_train_pack(str(root), SyntheticFaces(12, 4, seed=3), quality=90)
    return root


def run(root: Path, out: Path, max_steps: int, checkpoint_every: int = 3) -> Trainer:
    """Train iresnet_tiny_s2 (P x K = 3 x 2, 8 steps per epoch) to ``max_steps``, resuming from ``out``."""
    overrides = tiny_run_overrides(
        "ckpt_faults",
        root,
        out,
        f"train.checkpoint_every={checkpoint_every}",
        "train.keep_checkpoints=2",
        f"train.max_steps={max_steps}",
    )
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.fit()
    return trainer


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


@pytest.fixture(scope="module")
def straight_8(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The network after 8 uninterrupted steps (checkpoints every 3)."""
    return state(run(pack, tmp_path_factory.mktemp("straight_8"), max_steps=8))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_middle_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage", [truncate, flip_middle_byte], ids=["truncated", "flipped_byte"])
def test_damaged_last_checkpoint_resumes_from_the_newest_that_loads(
    pack: Path, tmp_path: Path, straight_8: dict[str, torch.Tensor], damage: Any
) -> None:
    out = tmp_path / "faulty"
    run(pack, out, max_steps=6)  # checkpoints at steps 3 and 6
    last = out / "checkpoint_last.pt"
    damage(last)  # a hard link: the step-6 file is the same bytes, damaged too
    if not os.path.samefile(last, out / "checkpoint_00000006.pt"):
        damage(out / "checkpoint_00000006.pt")  # file systems without hard links hold a copy
    resumed = run(pack, out, max_steps=8)
    assert resumed.resumed_from == out / "checkpoint_00000003.pt"
    assert resumed.step == 8
    assert_identical(straight_8, state(resumed))  # steps 4 to 6 were redone exactly
    log = (out / "train.log").read_text()
    skipped = [line for line in log.splitlines() if "skipping checkpoint" in line]
    assert any("checkpoint_00000006.pt" in line for line in skipped), skipped
    reason = "CRC-32 mismatch" if damage is flip_middle_byte else "Error"  # torch's own error, named
    assert all(reason in line for line in skipped), skipped


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = run(pack, tmp_path / "straight", max_steps=6, checkpoint_every=2)
    out = tmp_path / "faulty"
    real_save = torch.save
    seen: dict[str, Any] = {}

    def disk_fills_at_step_4(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        name = os.path.basename(getattr(f, "name", ""))
        if not name.startswith(".checkpoint_00000004.pt.tmp-"):
            return real_save(obj, f, *args, **kwargs)
        seen["before"] = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"}
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: buf.tell() // 2])  # half the bytes reach the disk, then it is full
        f.flush()
        seen["temp"] = out / name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    with pytest.raises(CheckpointError) as excinfo:
        run(pack, out, max_steps=6, checkpoint_every=2)
    monkeypatch.undo()
    message = str(excinfo.value)
    assert "step 4" in message and "No space left on device" in message
    assert "checkpoint_00000002.pt" in message and "train.resume=auto" in message
    assert "\n" not in message
    # The previous checkpoint is byte for byte what it was, and the half-written file is gone.
    assert not seen["temp"].exists()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"}
    assert after == seen["before"]
    assert {"checkpoint_00000002.pt", "checkpoint_last.pt"} <= set(after)
    assert "checkpoint_00000004.pt" not in after
    found = CheckpointManager(out).load_latest()
    assert found is not None and found[0]["step"] == 2
    # Once there is space again, the same command continues from step 2 and ends where a straight run does.
    resumed = run(pack, out, max_steps=6, checkpoint_every=2)
    assert resumed.resumed_from is not None and resumed.resumed_from.name in (
        "checkpoint_00000002.pt",
        "checkpoint_last.pt",
    )
    assert_identical(state(straight), state(resumed))
