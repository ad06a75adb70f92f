"""scripts/train.py as users run it: plain python, config errors, wrong launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_pair_bin, write_train_pack
from facems.train.distributed import LaunchError, init_distributed

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"


def train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_unknown_key_is_a_config_error_listing_the_valid_keys() -> None:
    result = train("optim.lrr=0.1")
    assert result.returncode == 2
    assert "config error" in result.stderr and "optim.lrr" in result.stderr and "lr" in result.stderr


def test_wrong_type_is_a_config_error() -> None:
    result = train("data.p=many")
    assert result.returncode == 2 and "data.p" in result.stderr


def test_print_config_shows_the_resolved_values() -> None:
    result = train("--print-config", "optim.lr=0.05")
    assert result.returncode == 0 and "lr: 0.05" in result.stdout and "name: synthetic_demo" in result.stdout


def test_partial_launch_environment_is_a_launch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(LaunchError, match="torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(LaunchError, match="RANK=5"):
        init_distributed("cpu")


def test_one_process_run_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write_train_pack(str(root), SyntheticFaces(8, 4, seed=1), quality=90)
    write_pair_bin(str(root / "cplfw.bin"), SyntheticFaces(20, 4, seed=2, identity_offset=500), 1, folds=10)
    out = tmp_path / "run"
    result = train(
        f"data.root={root}",
        f"train.output_dir={out}",
        "data.val_targets=[cplfw]",
        "data.p=2",
        "data.k=2",
        "data.num_workers=1",
        "model.num_features=32",
        "train.max_steps=3",
        "train.precision=fp32",
        "log.every_steps=1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval" in r for r in records)
    assert (out / "checkpoint_last.pt").is_file() and (out / "model.pt").is_file()
    assert list((out / "tb").iterdir())  # TensorBoard event file


def test_init_from_that_does_not_fit_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    from facems.models import create_model

    root = tmp_path / "data"
    root.mkdir()
    write_train_pack(str(root), SyntheticFaces(4, 4, seed=1), quality=90)
    weights = tmp_path / "backbone.pth"
    torch.save({"module." + k: v for k, v in create_model("iresnet18").state_dict().items()}, weights)
    result = train(
        f"data.root={root}",
        f"train.output_dir={tmp_path / 'run'}",
        "data.val_targets=[]",
        "data.p=2",
        "data.k=2",
        f"model.init_from={weights}",
        "train.max_steps=1",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model.init_from" in result.stderr and "does not fit iresnet_nano_s2" in result.stderr
