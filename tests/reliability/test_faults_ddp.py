"""Faults under DDP (2 gloo processes on CPU): every rank must take the same decision at the same step.

One scenario, run once (module fixture, one spawn), checked by several tests:

phase 1 (fresh run, eval and checkpoint every 2 steps, max 8 steps)
    rank 0 is slow in evaluation (a sleep in each eval forward pass): the other rank waits inside the
    evaluation's own collectives, never in a training collective;
    rank 1 alone sees a NaN loss value in step 3 (its gradients stay finite): both ranks skip step 3;
    rank 0's disk fills while it writes the step-4 checkpoint: both ranks stop with CheckpointError.
phase 2 (the same command again, train.resume=auto)
    resumes from step 2; rank 1 alone receives SIGTERM in step 4: both ranks stop after step 4 and
    the checkpoint of step 4 is written.

A rank that decided differently would leave its peer in a collective until the 60 s timeout of
run_in_ddp's process group, and the fixture would fail with that timeout.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from facems.config import load_config
from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_pair_bin, write_train_pack
from facems.models import create_model
from facems.protocols.pairs import verify_bin
from facems.testing import run_in_ddp, tiny_run_overrides
from facems.train.checkpoint import CheckpointError, load_checkpoint
from facems.train.distributed import init_distributed
from facems.train.loop import Trainer, TrainingInterrupted

EVAL_SLEEP_S = 0.2


def make_trainer(root: str, out: str) -> Trainer:
    """iresnet_tiny_s2, P x K = 2 x 2 per rank on 2 ranks: 8 images per global step, 6 steps per epoch."""
    overrides = tiny_run_overrides(
        "ddp_faults",
        root,
        out,
        "data.val_targets=[cplfw]",
        "data.p=2",
        "train.checkpoint_every=2",
        "train.max_steps=8",
        "eval.every_steps=2",
        "eval.batch_size=8",
        "eval.at_start=false",
    )
    cfg = load_config(None, overrides)
    return Trainer(cfg, init_distributed("cpu"))


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tensors, not lists: torch.load(weights_only=True) of millions of Python floats takes seconds.
    return {k: v.detach().clone() for k, v in state.items()}


def _hook_on_call(module: torch.nn.Module, call: int, action: Any, training: bool = True) -> None:
    """Run ``action()`` in the forward pre-hook of ``module``'s ``call``-th forward pass in that mode."""
    count = {"n": 0}

    def hook(m: torch.nn.Module, args: Any) -> None:
        if m.training == training:
            count["n"] += 1
            if count["n"] == call:
                action()

    module.register_forward_pre_hook(hook)


def _scenario(rank: int, world: int, root: str, out: str) -> dict[str, Any]:
    result: dict[str, Any] = {"rank": rank}
    # ---- phase 1
    t = make_trainer(root, out)
    evals: list[dict[str, Any]] = []
    original_evaluate = t.evaluate

    def evaluate_and_record() -> Any:
        own = {k: b.detach().clone() for k, b in t.backbone.named_buffers()}
        results = original_evaluate()
        after = {k: b.detach().clone() for k, b in t.backbone.named_buffers()}
        evals.append(
            {
                "step": t.step,
                "results": results,
                "own_buffers": _copy(own),
                "buffers_restored": all(torch.equal(own[k], after[k]) for k in own),
            }
        )
        return results

    t.evaluate = evaluate_and_record  # type: ignore[method-assign]
    if rank == 0:  # slow evaluation on rank 0 only

        def slow_eval(m: torch.nn.Module, args: Any) -> None:
            if not m.training:
                time.sleep(EVAL_SLEEP_S)

        t.backbone.register_forward_pre_hook(slow_eval)
    if rank == 1:  # a NaN loss value on rank 1 only, in step 3; its gradients stay finite
        count = {"n": 0}

        def nan_loss(m: torch.nn.Module, args: Any, loss: torch.Tensor) -> Any:
            count["n"] += 1
            return loss + torch.tensor(float("nan")) if count["n"] == 3 else None

        t.pair_loss.register_forward_hook(nan_loss)
    real_save = torch.save

    def disk_full_at_step_4(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(getattr(f, "name", "")).startswith(".checkpoint_00000004.pt.tmp-"):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    if rank == 0:
        torch.save = disk_full_at_step_4  # restored below; this is a process of its own
    try:
        t.fit()
    except CheckpointError as e:
        result["phase1_error"] = str(e)
    finally:
        torch.save = real_save
    result["phase1_step"] = t.step
    result["phase1_bad_total"] = t.bad_total
    result["phase1_params"] = _copy({k: p for k, p in t.net.named_parameters()})
    result["phase1_files"] = sorted(os.listdir(out))
    result["evals"] = evals
    # ---- phase 2: the same command again
    t2 = make_trainer(root, out)
    result["resumed_from"] = str(t2.resumed_from)
    result["resumed_step"] = t2.step
    if rank == 1:  # SIGTERM to rank 1 alone, during step 4 (the second training forward pass here)
        _hook_on_call(t2.backbone, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        t2.fit()
    except TrainingInterrupted as e:
        result["stop"] = [e.signum, e.step]
    result["phase2_step"] = t2.step
    result["phase2_params"] = _copy({k: p for k, p in t2.net.named_parameters()})
    return result


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("ddp_pack")
    write_train_pack(str(root), SyntheticFaces(12, 4, seed=3), quality=90)
    write_pair_bin(
        str(root / "cplfw.bin"), SyntheticFaces(20, 4, seed=4, identity_offset=10_000), 1, folds=10
    )
    out = tmp_path_factory.mktemp("ddp_run")
    results = run_in_ddp(2, _scenario, str(root), str(out), timeout=240)
    return root, out, results


pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(300)]


def test_one_rank_non_finite_loss_is_skipped_on_every_rank(scenario: Any) -> None:
    _, _, (r0, r1) = scenario
    assert r0["phase1_bad_total"] == r1["phase1_bad_total"] == 1
    torch.testing.assert_close(
        r0["phase1_params"], r1["phase1_params"], rtol=0, atol=0
    )  # the same update (none in step 3) on both ranks


def test_failed_checkpoint_write_stops_every_rank_and_keeps_the_previous_one(scenario: Any) -> None:
    _, out, (r0, r1) = scenario
    assert r0["phase1_step"] == r1["phase1_step"] == 4
    assert "No space left on device" in r0["phase1_error"] and "checkpoint_00000002.pt" in r0["phase1_error"]
    assert "rank 0 could not write the checkpoint of step 4" in r1["phase1_error"]
    files = r0["phase1_files"]
    assert "checkpoint_00000002.pt" in files and "checkpoint_00000004.pt" not in files
    assert not [name for name in files if ".tmp-" in name]
    assert r0["resumed_from"] == r1["resumed_from"] == str(out / "checkpoint_00000002.pt")
    assert r0["resumed_step"] == r1["resumed_step"] == 2


def test_sigterm_to_one_rank_stops_all_ranks_after_the_same_step(scenario: Any) -> None:
    _, out, (r0, r1) = scenario
    assert r0["stop"] == r1["stop"] == [int(signal.SIGTERM), 4]
    assert r0["phase2_step"] == r1["phase2_step"] == 4
    assert load_checkpoint(out / "checkpoint_last.pt")["step"] == 4
    torch.testing.assert_close(r0["phase2_params"], r1["phase2_params"], rtol=0, atol=0)


def test_evaluation_with_a_slow_rank_agrees_and_reports_the_saved_model(scenario: Any) -> None:
    root, out, (r0, r1) = scenario
    assert [e["step"] for e in r0["evals"]] == [e["step"] for e in r1["evals"]] == [2, 4]
    for e0, e1 in zip(r0["evals"], r1["evals"]):
        assert e0["results"] == e1["results"]  # one gathered result on both ranks
        assert e0["buffers_restored"] and e1["buffers_restored"]  # rank 1 trains on with its own statistics
    # BatchNorm statistics are rank-local: at step 2 the ranks' differ ...
    own0, own1 = r0["evals"][0]["own_buffers"], r1["evals"][0]["own_buffers"]
    assert any(not torch.equal(own0[k], own1[k]) for k in own0 if "running" in k)
    # ... and the accuracy reported at step 2 is that of the saved step-2 model (rank 0's statistics),
    # evaluated again here in one process.
    backbone = create_model("iresnet_tiny_s2", num_features=32)
    backbone.load_state_dict(load_checkpoint(out / "checkpoint_00000002.pt")["model"])
    alone = verify_bin(backbone, root / "cplfw.bin", batch_size=8, flip=True, distributed=False)
    reported = r0["evals"][0]["results"]["cplfw"]
    assert reported["accuracy"] == pytest.approx(float(alone.accuracy), abs=1e-12)
    np.testing.assert_allclose(reported["xnorm"], float(alone.xnorm), rtol=1e-5)
