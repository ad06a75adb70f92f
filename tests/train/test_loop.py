"""The training loop end to end on a tiny synthetic pack: files written, exact resume, NaN handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from facems.config import load_config
from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_pair_bin, write_train_pack
from facems.models import create_model
from facems.testing import run_in_ddp, tiny_run_overrides
from facems.train.checkpoint import CheckpointManager
from facems.train.distributed import init_distributed
from facems.train.loop import Trainer, TrainingDiverged, resolve_precision


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_pack")
    write_train_pack(str(root), SyntheticFaces(12, 4, seed=3), quality=90)
    write_pair_bin(
        str(root / "cplfw.bin"), SyntheticFaces(20, 4, seed=4, identity_offset=10_000), 1, folds=10
    )
    return root


def tiny_config(root: Path, out: Path, *extra: str) -> Any:
    """facems.testing's tiny run (iresnet_tiny_s2, P x K = 3 x 2 per rank: 8 steps per epoch on one
    process) with cplfw evaluated every 4 steps and a checkpoint every 3."""
    overrides = tiny_run_overrides(
        "tiny",
        root,
        out,
        "data.val_targets=[cplfw]",
        "schedule.warmup_epochs=0.5",
        "train.checkpoint_every=3",
        "eval.every_steps=4",
        "eval.batch_size=16",
        *extra,
    )
    return load_config(None, overrides)


def run(cfg: Any) -> Trainer:
    info = init_distributed("cpu")
    trainer = Trainer(cfg, info)
    trainer.fit()
    return trainer


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_resolve_precision_on_cpu() -> None:
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    with pytest.raises(ValueError, match=r"train\.precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_fit_writes_the_run_folder(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path / "run", "train.max_steps=5", "eval.at_start=true")
    trainer = run(cfg)
    assert trainer.step == 5
    out = tmp_path / "run"
    for name in (
        "config.yaml",
        "train.log",
        "metrics.jsonl",
        "model.pt",
        "model_best.pt",
        "checkpoint_last.pt",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [0, 4, 5]  # at start, every 4 steps, at the end
    assert 0.0 <= evals[-1]["eval"]["cplfw"]["accuracy"] <= 1.0
    backbone = create_model("iresnet_tiny_s2", num_features=32)
    backbone.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    found = CheckpointManager(out).load_latest()
    assert found is not None and found[0]["step"] == 5
    assert found[0]["sampler"]["steps_done"] == 5


HYBRID = ("loss.xbm_size=10", "loss.margin_head=cosface", "loss.margin_scale=16.0", "loss.margin=0.2")


@pytest.mark.parametrize(
    ("extra", "stop", "final"),
    [
        ((), 6, 11),  # 8 steps per epoch: resume inside epoch 0, finish inside epoch 1
        (HYBRID, 6, 11),  # memory and margin head restored too
        (("optim.grad_accum=2",), 3, 7),  # 4 optimizer steps per epoch
    ],
    ids=["ms", "xbm+cosface", "grad_accum"],
)
def test_resume_gives_the_same_parameters(
    data_root: Path, tmp_path: Path, extra: tuple[str, ...], stop: int, final: int
) -> None:
    straight = run(tiny_config(data_root, tmp_path / "a", f"train.max_steps={final}", *extra))
    # Stop at `stop` (a checkpoint every 3 steps and at the end), then resume to `final`.
    first = run(tiny_config(data_root, tmp_path / "b", f"train.max_steps={stop}", *extra))
    assert first.step == stop
    resumed = run(tiny_config(data_root, tmp_path / "b", f"train.max_steps={final}", *extra))
    assert resumed.resumed_from is not None and resumed.step == final
    if straight.memory is not None and resumed.memory is not None:
        assert len(straight.memory) == 10
        torch.testing.assert_close(straight.memory.get()[0], resumed.memory.get()[0], rtol=0, atol=0)
    assert_same(params(straight), params(resumed))
    opt_a, opt_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():  # AdamW moments and step counts
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][key][name], rtol=0, atol=0, msg=f"{key}.{name}")


def nan_input_hook(steps: set[int]) -> Any:
    """A forward pre-hook that turns the backbone's input into NaN on the given training calls (1-based)."""
    calls = {"n": 0}

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
        if not module.training:
            return None
        calls["n"] += 1
        return (args[0] * float("nan"),) if calls["n"] in steps or not steps else None

    return hook


def test_non_finite_step_is_skipped(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path / "nan", "train.max_steps=3", "eval.every_steps=0")
    trainer = Trainer(cfg, init_distributed("cpu"))
    # NaN input in step 2: the loss, the gradients and the BN running statistics all see it.
    trainer.backbone.register_forward_pre_hook(nan_input_hook({2}))
    trainer.fit()
    assert trainer.step == 3 and trainer.bad_total == 1
    state = trainer.net.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    records = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps") for r in records if "loss" in r] == [0, 1, 1]
    assert (tmp_path / "nan" / "checkpoint_last.pt").is_file()


def test_repeated_non_finite_steps_stop_training(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path / "div", "train.max_bad_steps=2", "eval.every_steps=0")
    trainer = Trainer(cfg, init_distributed("cpu"))
    before = params(trainer)
    trainer.backbone.register_forward_pre_hook(nan_input_hook(set()))  # every training call
    with pytest.raises(TrainingDiverged, match="2 consecutive steps"):
        trainer.fit()
    assert trainer.step == 1 and trainer.bad_total == 2  # the step that stops training is not counted
    assert_same(before, params(trainer))  # nothing was applied, BN buffers restored
    assert not list((tmp_path / "div").glob("checkpoint_*.pt"))


def _ddp_runs(rank: int, world: int, root: str, runs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Train to ``max_steps`` in each ``(out, max_steps)`` run in turn, in the same two processes."""
    results = []
    for out, max_steps in runs:
        trainer = run(tiny_config(Path(root), Path(out), f"train.max_steps={max_steps}", "data.p=2"))
        results.append(
            {
                "step": trainer.step,
                "params": {k: v for k, v in params(trainer).items() if v.is_floating_point()},
                "resumed": trainer.resumed_from is not None,
            }
        )
    return results


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_process_run_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    # P=2 x K=2 per rank, 2 ranks: 8 images per global step, 48 images: 6 steps per epoch. The straight
    # run and the run stopped at step 4 share one pair of processes (each Trainer seeds itself from
    # the config); the resume starts fresh processes, as a restarted job would.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first = run_in_ddp(2, _ddp_runs, str(data_root), [(a, 8), (b, 4)], timeout=240)
    straight = [first[0][0], first[1][0]]
    assert first[0][1]["step"] == 4 and not first[0][1]["resumed"]
    resumed = [r[0] for r in run_in_ddp(2, _ddp_runs, str(data_root), [(b, 8)], timeout=240)]
    assert resumed[0]["resumed"] and resumed[0]["step"] == 8
    # Rank 0 ends exactly where the straight run did, BatchNorm statistics included. BN statistics
    # are rank-local (as in arcface_torch) and a checkpoint holds rank 0's, so after a resume rank 1
    # continues from rank 0's statistics; its trained weights are the same as rank 0's (DDP).
    for key, value in straight[0]["params"].items():
        torch.testing.assert_close(resumed[0]["params"][key], value, rtol=0, atol=1e-6, msg=key)
    for key in (k for k in straight[0]["params"] if "running" not in k):
        assert torch.equal(straight[0]["params"][key], straight[1]["params"][key]), key
        assert torch.equal(resumed[1]["params"][key], resumed[0]["params"][key]), key
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert train_records[-1]["images"] == 8 * 2 * 2 * 2  # steps x P x K x ranks: all ranks counted
    # The 2-process checkpoint resumes in one process (nothing is sharded).
    single = run(tiny_config(data_root, tmp_path / "b", "train.max_steps=9", "data.p=2"))
    assert single.resumed_from is not None and single.step == 9
