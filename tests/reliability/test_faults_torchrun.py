"""A worker killed with SIGKILL under ``torchrun --max-restarts=1``: the job restarts, resumes, and ends
with exactly the parameters of an uninterrupted run (2 gloo processes on CPU).

The kill comes from the trainer's test hook ``FACEMS_FAULT_KILL_AT_STEP=STEP:RANK`` (rank RANK sends
itself SIGKILL right after optimizer step STEP, in the first attempt only), so the step it dies at is
known and the test needs no polling. A second test reproduces the restart bug in torch's rendezvous
that facems.train.distributed works around (stale store keys from the failed attempt).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_train_pack
from facems.testing import tiny_run_overrides

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]


def torchrun(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    clean.pop("FACEMS_FAULT_KILL_AT_STEP", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "OMP_NUM_THREADS": "1", **env},
    )


def train_args(root: Path, out: Path) -> list[str]:
    """iresnet_tiny_s2, P x K = 2 x 2 per rank on 2 ranks (6 steps per epoch), 10 steps, checkpoints every 4."""
    return [
        str(SCRIPT),
        "--device",
        "cpu",
        *tiny_run_overrides(
            "torchrun_faults",
            root,
            out,
            "data.p=2",
            "schedule.warmup_epochs=0.5",
            "train.checkpoint_every=4",
            "train.max_steps=10",
            "log.every_steps=100",
        ),
    ]


def test_sigkilled_worker_restarts_and_ends_with_the_uninterrupted_parameters(tmp_path: Path) -> None:
    root = tmp_path / "pack"
    root.mkdir()
    write_train_pack(str(root), SyntheticFaces(12, 4, seed=3), quality=90)
    straight = torchrun(train_args(root, tmp_path / "straight"), {})
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    # Rank 1 dies after step 7; the newest checkpoint is step 4, so steps 5 to 7 are lost and redone.
    killed = torchrun(train_args(root, out), {"FACEMS_FAULT_KILL_AT_STEP": "7:1"})
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "exitcode: -9" in killed.stderr  # the agent saw the SIGKILL and restarted the workers
    log = (out / "train.rank1.log").read_text() + (out / "train.log").read_text()
    assert "rank 1 kills itself with SIGKILL after step 7" in log
    assert f"resumed from {out / 'checkpoint_00000004.pt'} at step 4" in log
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)
    b = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # weights and rank 0's BatchNorm statistics, bit for bit
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert a["sampler"] == b["sampler"] and a["progress"]["images_total"] == b["progress"]["images_total"]


RESTART_PROBE = """
import os, signal, time
import torch
import torch.distributed as dist
from facems.train.distributed import cleanup_distributed, init_distributed

attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
if attempt == "1" and rank == "1":
    time.sleep(8)  # the restarted rank 1 comes late; rank 0 must not use its old address
info = init_distributed("cpu", timeout_s=60)
t = torch.ones(1)
dist.all_reduce(t)
if attempt == "0" and rank == "1":
    os.kill(os.getpid(), signal.SIGKILL)
dist.all_reduce(t)
print(f"attempt {attempt} rank {rank} sum {t.item()}", flush=True)
cleanup_distributed(info)
"""


def test_restarted_workers_meet_in_a_fresh_rendezvous(tmp_path: Path) -> None:
    # With torch's env:// rendezvous alone, rank 0 of attempt 1 read rank 1's gloo address left over
    # from attempt 0 and failed with "Connection refused" (measured with torch 2.14.1).
    probe = tmp_path / "probe.py"
    probe.write_text(RESTART_PROBE)
    result = torchrun([str(probe)], {})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "attempt 1 rank 0 sum 4.0" in result.stdout and "attempt 1 rank 1 sum 4.0" in result.stdout
