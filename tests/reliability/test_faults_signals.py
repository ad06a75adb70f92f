"""SIGTERM and SIGINT: the trainer finishes its step, writes a checkpoint of it, and exits 128 + signal.

In process, the signal is sent from a hook inside a chosen step, so the step it stops after is known
exactly; through ``scripts/train.py`` it is sent from outside once a checkpoint exists, the way a
scheduler or a Ctrl-C does. In both, the resumed run must continue from the stop checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from facems.config import load_config
from facems.data.loader import build_face_loader
from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_train_pack
from facems.testing import tiny_run_overrides
from facems.train.checkpoint import CheckpointManager
from facems.train.distributed import init_distributed
from facems.train.loop import Trainer, TrainingInterrupted

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signal_pack")
    write_train_pack(str(root), SyntheticFaces(12, 4, seed=3), quality=90)
    return root


def trainer(root: Path, out: Path, max_steps: int) -> Trainer:
    """iresnet_tiny_s2, P x K = 3 x 2 on one process (8 steps per epoch), checkpoints every 3 steps."""
    overrides = tiny_run_overrides(
        "signals", root, out, "train.checkpoint_every=3", f"train.max_steps={max_steps}"
    )
    return Trainer(load_config(None, overrides), init_distributed("cpu"))


def state(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.net.state_dict().items()}


def signal_in_step(t: Trainer, step: int, signum: int) -> None:
    """Send ``signum`` to this process during the forward pass of optimizer step ``step`` (1-based)."""
    calls = {"n": 0}

    def hook(module: torch.nn.Module, args: Any) -> None:
        if module.training:
            calls["n"] += 1
            if calls["n"] == step:
                os.kill(os.getpid(), signum)

    t.backbone.register_forward_pre_hook(hook)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_it_and_resumes_exactly(
    pack: Path, tmp_path: Path, signum: int
) -> None:
    straight = trainer(pack, tmp_path / "straight", max_steps=8)
    straight.fit()
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out = tmp_path / "stopped"
    t = trainer(pack, out, max_steps=8)
    signal_in_step(t, 5, signum)
    with pytest.raises(TrainingInterrupted) as excinfo:
        t.fit()
    assert excinfo.value.signum == signum and excinfo.value.step == 5 and t.step == 5
    assert signal.Signals(signum).name in str(excinfo.value) and "train.resume=auto" in str(excinfo.value)
    assert {s: signal.getsignal(s) for s in handlers_before} == handlers_before  # handlers put back
    found = CheckpointManager(out).load_latest()
    assert found is not None and found[0]["step"] == 5  # the step it stopped after, not the last periodic one
    assert found[0]["sampler"]["steps_done"] == 5
    resumed = trainer(pack, out, max_steps=8)
    assert resumed.resumed_from is not None and resumed.step == 5
    resumed.fit()
    final, reference = state(resumed), state(straight)
    assert final.keys() == reference.keys()
    for key in final:
        assert torch.equal(final[key], reference[key]), key


def test_loader_workers_survive_a_signal_to_the_process_group(pack: Path, tmp_path: Path) -> None:
    """A Ctrl-C reaches every process of the group: the trainer decides, its loader workers must not die."""
    t = trainer(pack, tmp_path / "workers", max_steps=8)
    t.loader = build_face_loader(t.dataset, t.sampler, num_workers=1, pin_memory=False)  # one worker process
    before = set(multiprocessing.active_children())
    batches = t._batches()
    next(batches)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1
    pid = workers[0].pid
    assert pid is not None and pid != os.getpid()
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(pid, signum)
        time.sleep(0.5)
        assert workers[0].is_alive()
        images, labels = next(batches)  # the worker still serves batches
        assert images.shape[0] == labels.shape[0] == 6
    finally:
        t.loader.close()
        del batches


def start(root: Path, out: Path, max_steps: int) -> subprocess.Popen[str]:
    """``python scripts/train.py`` in its own process group (so that a group signal reaches only it)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    args = tiny_run_overrides(
        "signals",
        root,
        out,
        "data.num_workers=1",  # a loader worker process, which must survive a signal to the group
        "train.checkpoint_every=2",
        f"train.max_steps={max_steps}",
    )
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--device", "cpu", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**clean, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"train.py exited ({proc.returncode}) before {path.name} appeared: {proc.stderr.read()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)


def stop_step(out: Path) -> int:
    found = CheckpointManager(out).load_latest()
    assert found is not None
    return int(found[0]["step"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_script_stops_on_sigterm_and_on_ctrl_c_and_resumes(pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 1. SIGTERM to the trainer process once the step-2 checkpoint exists.
    proc = start(pack, out, max_steps=400)
    wait_for(out / "checkpoint_00000002.pt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    first = stop_step(out)
    assert 2 <= first < 400
    assert f"SIGTERM received: stopped after step {first}" in err.strip().splitlines()[-1]
    assert (out / f"checkpoint_{first:08d}.pt").is_file()
    # 2. The same command resumes from that step; Ctrl-C (SIGINT to the whole process group,
    # the loader worker included) once it has written a checkpoint of its own.
    proc = start(pack, out, max_steps=400)
    wait_for(out / f"checkpoint_{first + 2 - first % 2:08d}.pt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    second = stop_step(out)
    assert second > first
    assert f"SIGINT received: stopped after step {second}" in err.strip().splitlines()[-1]
    log = (out / "train.log").read_text()
    assert f"resumed from {out / f'checkpoint_{first:08d}.pt'} at step {first}" in log
