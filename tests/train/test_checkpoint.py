"""Atomic checkpoints, the checkpoint manager's fallback on bad files, and RNG state capture/restore."""
# The legacy global NumPy generator is exactly what facems.train.rng captures, so these tests use it.
# ruff: noqa: NPY002

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from facems.train.checkpoint import CheckpointError, CheckpointManager, atomic_save, save_model_pt
from facems.train.rng import capture_rng_state, restore_rng_state

LOGGER = "facems.train.checkpoint"


@pytest.fixture(autouse=True)
def _keep_global_rng_states():
    """These tests reseed the global generators; put them back for whatever runs next."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def _draw() -> tuple[list[float], list[float], torch.Tensor]:
    """Numbers from each global generator, including the cached-Gaussian paths of Python and NumPy."""
    py = [random.random(), random.gauss(0.0, 1.0), random.getrandbits(64)]
    npy = [*np.random.rand(3).tolist(), float(np.random.standard_normal())]
    return py, npy, torch.randn(5)


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _trained_model_and_optimizer(seed: int) -> tuple[nn.Linear, torch.optim.SGD]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)
    model(x).square().sum().backward()
    opt.step()
    return model, opt


def _one_more_step(model: nn.Linear, opt: torch.optim.SGD) -> None:
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


# --- RNG state -------------------------------------------------------------------------------------


@pytest.mark.parametrize("through_file", [False, True])
def test_rng_restore_replays_every_generator(through_file: bool) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in Python's state (gauss_next is not None)
    np.random.standard_normal()  # and in NumPy's (has_gauss == 1)
    state = capture_rng_state()
    assert state["python"]["gauss_next"] is not None
    assert state["numpy"]["has_gauss"] == 1
    if through_file:
        state = _roundtrip(state)
    first = _draw()
    _draw()  # move further on, so that restoring has something to undo
    restore_rng_state(state)
    second = _draw()
    assert first[0] == second[0]
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_rng_state_is_plain_and_restores_exact_internal_state() -> None:
    random.seed(5)
    np.random.seed(6)
    py_before, np_before, torch_before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    state = _roundtrip(capture_rng_state())
    random.seed(50)
    np.random.seed(60)
    torch.manual_seed(70)
    restore_rng_state(state)
    assert random.getstate() == py_before
    np_after = np.random.get_state()
    assert np_after[0] == np_before[0]
    assert np.array_equal(np_after[1], np_before[1]) and np_after[1].dtype == np.uint32
    assert np_after[2:] == np_before[2:]
    assert torch.equal(torch.get_rng_state(), torch_before)


def test_rng_restore_rejects_malformed_state_without_changing_anything() -> None:
    random.seed(7)
    state = capture_rng_state()
    before = random.getstate()
    broken = dict(state)
    del broken["numpy"]
    with pytest.raises(ValueError, match=r"missing key 'numpy'"):
        restore_rng_state(broken)
    broken = {**state, "python": {**state["python"], "state": state["python"]["state"][:-1]}}
    with pytest.raises(ValueError, match=r"rng_state\['python'\]\['state'\]: expected 625 words, got 624"):
        restore_rng_state(broken)
    assert random.getstate() == before


# --- atomic_save ---------------------------------------------------------------------------------


def _disk_full_save(written: list[str]):
    """A torch.save that writes half of the real bytes, then fails as a full disk does."""
    real_save = torch.save

    def fake_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        written.append(os.path.basename(f.name))
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return fake_save


def test_atomic_save_disk_full_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state.pt"
    atomic_save({"v": torch.arange(1000)}, target)
    old_bytes = target.read_bytes()
    written: list[str] = []
    monkeypatch.setattr(torch, "save", _disk_full_save(written))
    with pytest.raises(OSError) as excinfo:
        atomic_save({"v": torch.zeros(1000)}, target)
    assert excinfo.value.errno == errno.ENOSPC
    assert written == [f".state.pt.tmp-{os.getpid()}"]  # the temporary name lies in the same folder
    assert target.read_bytes() == old_bytes
    assert _files(tmp_path) == ["state.pt"]


def test_atomic_save_fsync_failure_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "state.pt"
    atomic_save({"v": 1}, target)
    old_bytes = target.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_save({"v": 2}, target)
    assert target.read_bytes() == old_bytes
    assert _files(tmp_path) == ["state.pt"]
    monkeypatch.undo()
    atomic_save({"v": 2}, target)
    assert torch.load(target, weights_only=True) == {"v": 2}


def test_atomic_save_unserialisable_object_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises for a lambda)
        atomic_save({"f": lambda: 0}, tmp_path / "x.pt")
    assert _files(tmp_path) == []


# --- CheckpointManager ----------------------------------------------------------------------------


def test_save_load_round_trip_resumes_training_exactly(tmp_path: Path) -> None:
    model, opt = _trained_model_and_optimizer(seed=0)
    sampler = {"seed": 0, "epoch": 3, "position": 17, "order": [4, 1, 3]}
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "sampler": sampler,
        "rng": capture_rng_state(),
        "step": 11,
        "config": {"loss": {"alpha": 2.0, "beta": 40.0}, "name": "synthetic"},
    }
    manager = CheckpointManager(tmp_path / "ckpt")
    path = manager.save(state, step=11)
    assert path == tmp_path / "ckpt" / "checkpoint_00000011.pt"
    found = manager.load_latest()
    assert found is not None
    loaded, loaded_path = found
    assert loaded_path == manager.step_path(11)  # newest step file first; last is its hard link
    assert loaded["sampler"] == sampler and loaded["step"] == 11 and loaded["config"] == state["config"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    assert torch.equal(
        loaded["optimizer"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    # Independent check: a fresh model + optimizer restored from the file takes the same next step as
    # the originals (momentum included).
    fresh = nn.Linear(4, 3)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.0)
    fresh.load_state_dict(loaded["model"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    _one_more_step(model, opt)
    _one_more_step(fresh, fresh_opt)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    restore_rng_state(loaded["rng"])


def test_keep_prunes_to_newest_step_files(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (100, 200, 300, 400):
        manager.save({"step": step}, step)
    assert _files(tmp_path) == ["checkpoint_00000300.pt", "checkpoint_00000400.pt", "checkpoint_last.pt"]
    assert [s for s, _ in manager.step_files()] == [300, 400]
    found = manager.load_latest()
    assert found is not None and found[0] == {"step": 400}
    # A run resumed from an earlier step keeps the file it just wrote.
    manager.save({"step": 250}, 250)
    assert [s for s, _ in manager.step_files()] == [250, 300, 400]
    assert torch.load(manager.last_path, weights_only=True) == {"step": 250}


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def test_load_latest_empty_folder_returns_none(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "new").load_latest() is None


@pytest.mark.parametrize("link", ["hardlink", "copy"])
def test_truncated_last_falls_back_to_newest_loadable(tmp_path: Path, monkeypatch, caplog, link: str) -> None:
    if link == "copy":

        def no_links(src: Any, dst: Any) -> None:
            raise OSError(errno.EPERM, "hard links not supported")

        monkeypatch.setattr(os, "link", no_links)
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2, 3):
        manager.save({"step": step, "w": torch.full((256,), float(step))}, step)
    newest = manager.step_path(3)
    assert os.path.samefile(manager.last_path, newest) == (link == "hardlink")
    size = manager.last_path.stat().st_size
    with open(manager.last_path, "r+b") as f:
        f.truncate(size // 2)
    # With a hard link, the newest step file is the same bytes and is truncated too.
    expected = 2 if link == "hardlink" else 3
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = manager.load_latest()
    assert found is not None
    state, path = found
    assert state["step"] == expected and path == manager.step_path(expected)
    assert torch.equal(state["w"], torch.full((256,), float(expected)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if link == "hardlink":  # step 3 is read first and fails; the last link is never needed
        assert any("checkpoint_00000003.pt" in m for m in warnings)
    else:  # the intact step 3 file is newest and loads: the truncated copy is never read
        assert not warnings


def test_flipped_byte_in_tensor_data_is_detected(tmp_path: Path, caplog) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save({"w": torch.arange(4096, dtype=torch.float32)}, 1)
    manager.save({"w": torch.arange(4096, dtype=torch.float32) * 2}, 2)
    # Flip one byte in the middle (tensor data) of step 2 and of checkpoint_last.pt, in place.
    targets = [manager.step_path(2)]
    if not os.path.samefile(manager.last_path, manager.step_path(2)):
        targets.append(manager.last_path)
    for path in targets:
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0xFF]))
    assert not torch.equal(  # torch.load alone returns a wrong tensor from this file
        torch.load(manager.step_path(2), weights_only=True)["w"], torch.arange(4096, dtype=torch.float32) * 2
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = manager.load_latest()
    assert found is not None
    assert torch.equal(found[0]["w"], torch.arange(4096, dtype=torch.float32))
    assert any("CRC" in r.getMessage() for r in caplog.records)


def test_all_corrupted_raises_naming_every_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2):
        manager.save({"step": step}, step)
    os.unlink(manager.last_path)  # break the hard link so that each file is damaged on its own
    manager.last_path.write_bytes(b"\x00" * 64)
    manager.step_path(2).write_bytes(b"PK\x03\x04 garbage")
    torch.save([1, 2, 3], manager.step_path(1))  # loads, but is not a checkpoint dict
    with pytest.raises(CheckpointError) as excinfo:
        manager.load_latest()
    message = str(excinfo.value)
    for name in ("checkpoint_last.pt", "checkpoint_00000002.pt", "checkpoint_00000001.pt"):
        assert name in message
    assert "expected a dict, got list" in message


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save({"step": 1, "w": torch.ones(1000)}, 1)
    before = {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)}
    written: list[str] = []
    monkeypatch.setattr(torch, "save", _disk_full_save(written))
    with pytest.raises(OSError) as excinfo:
        manager.save({"step": 2, "w": torch.zeros(1000)}, 2)
    assert excinfo.value.errno == errno.ENOSPC
    assert written  # the fake really ran
    monkeypatch.undo()
    assert _files(tmp_path) == sorted(before)  # no temporary file, no step-2 file
    assert {name: (tmp_path / name).read_bytes() for name in _files(tmp_path)} == before
    found = manager.load_latest()
    assert found is not None and found[0]["step"] == 1


def test_save_refuses_values_weights_only_cannot_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=r"\['metrics'\]\['acc'\]: numpy.float64"):
        manager.save({"metrics": {"acc": np.float64(0.9)}}, 1)
    assert _files(tmp_path) == []
    # The check agrees with torch: the same value really is refused by a weights_only load.
    with pytest.raises(pickle.UnpicklingError):
        _roundtrip({"acc": np.float64(0.9)})


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, caplog) -> None:
    # The payload is real: a plain pickle.loads runs it.
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    ckpt = tmp_path / "ckpt"
    marker = tmp_path / "pwned"
    manager = CheckpointManager(ckpt, keep=3)
    manager.save({"step": 1}, 1)
    os.unlink(manager.last_path)
    with open(manager.last_path, "wb") as f:  # a raw pickle (torch's legacy format)
        pickle.dump({"step": 9, "x": _Payload(marker)}, f, protocol=2)
    torch.save({"step": 2, "x": _Payload(marker)}, manager.step_path(2))  # torch's zip format
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = manager.load_latest()
    assert not marker.exists()
    assert found is not None and found[0] == {"step": 1} and found[1] == manager.step_path(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint_00000002.pt" in m and "UnpicklingError" in m for m in warnings)
    # With no step file left, the malicious raw pickle in checkpoint_last.pt is tried and refused.
    for _, path in manager.step_files():
        os.unlink(path)
    with pytest.raises(CheckpointError, match=r"checkpoint_last\.pt: .*UnpicklingError"):
        manager.load_latest()
    assert not marker.exists()


# --- save_model_pt ----------------------------------------------------------------------------------


def test_save_model_pt_round_trip(tmp_path: Path) -> None:
    model, _ = _trained_model_and_optimizer(seed=1)
    path = tmp_path / "model.pt"
    save_model_pt(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["weight", "bias"]
    fresh = nn.Linear(4, 3)
    fresh.load_state_dict(loaded)
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x), model(x))
    assert _files(tmp_path) == ["model.pt"]


def test_save_model_pt_refuses_ddp_prefix_and_non_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with pytest.raises(CheckpointError, match="module\\."):
        save_model_pt({"module.weight": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match=r"state_dict\['step'\] is a int"):
        save_model_pt({"weight": torch.ones(1), "step": 3}, path)  # type: ignore[dict-item]
    assert not path.exists()


def test_newest_step_file_wins_over_a_stale_last(tmp_path: Path) -> None:
    # A process killed after writing step 2 but before swapping checkpoint_last.pt: resume uses step 2.
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save({"step": 1}, 1)
    last_after_1 = manager.last_path.read_bytes()
    manager.save({"step": 2}, 2)
    os.unlink(manager.last_path)
    manager.last_path.write_bytes(last_after_1)
    found = manager.load_latest()
    assert found is not None and found[0] == {"step": 2} and found[1] == manager.step_path(2)
