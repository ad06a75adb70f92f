"""eval/retrieval.py: runs on the synthetic CUB set with a tiny random iresnet, prints the table, writes JSON equal
to the library's result; errors name the problem."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import CUB_IDS, write_cub_like
from facems.models import create_model
from facems.protocols.retrieval import evaluate_retrieval, read_cub

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_cub_like(str(root), SyntheticFaces(16, 4, 1, identity_offset=CUB_IDS))
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("iresnet_tiny", num_features=64).eval()
    weights = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(model.state_dict(), weights)
    return model, weights


def _load_cli() -> ModuleType:
    """eval/retrieval.py as a module (the eval folder is not a package)."""
    spec = importlib.util.spec_from_file_location("facems_eval_retrieval", REPO / "eval" / "retrieval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_prints_table_and_writes_json(
    cub_root: Path, tiny_model: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    model, weights = tiny_model
    out = tmp_path / "res" / "cub.json"
    cmd = [
        sys.executable,
        str(REPO / "eval" / "retrieval.py"),
        "--model",
        str(weights),
        "--model-name",
        "iresnet_tiny",
        "--num-features",
        "64",
        "--dataset",
        "cub",
        "--root",
        str(cub_root),
        "--resize",
        "112",
        "--crop",
        "112",
        "--normalize",
        "face",
        "--workers",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert (
        payload["model_name"] == "iresnet_tiny" and payload["normalize"] == "face" and payload["crop"] == 112
    )
    res = payload["result"]
    assert res["dataset"] == "cub" and res["ks"] == [1, 2, 4, 8]
    assert (res["num_queries"], res["num_references"], res["embedding_dim"]) == (32, 32, 64)
    want = evaluate_retrieval(
        model, read_cub(str(cub_root)), resize=112, crop=112, mean=(0.5,) * 3, std=(0.5,) * 3, num_workers=0
    )
    assert res["metrics"] == pytest.approx(want.metrics, abs=1e-9)
    assert "| R@1 | R@2 | R@4 | R@8 | MAP@R | RP |" in proc.stdout
    row = (
        "| "
        + " | ".join(
            f"{want.metrics[k] * 100:.2f}"
            for k in ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"]
        )
        + " |"
    )
    assert row in proc.stdout
    assert "### cub (32 queries searched in themselves, dim 64)" in proc.stdout


def test_cli_custom_ks_in_process(
    cub_root: Path, tiny_model: tuple[torch.nn.Module, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, weights = tiny_model
    cli = _load_cli()
    args = [
        *("--model", str(weights), "--model-name", "iresnet_tiny", "--num-features", "64"),
        *("--dataset", "cub", "--root", str(cub_root), "--resize", "128", "--crop", "112"),
        *("--workers", "0", "--device", "cpu", "--ks", "1", "3"),
    ]
    assert cli.main(cli.get_args_parser().parse_args(args)) == 0
    assert "| R@1 | R@3 | MAP@R | RP |" in capsys.readouterr().out


def test_cli_errors_name_the_problem(
    cub_root: Path,
    tiny_model: tuple[torch.nn.Module, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, weights = tiny_model
    cli = _load_cli()
    base = ["--model", str(weights), "--device", "cpu", "--num-features", "64"]
    missing = tmp_path / "nowhere"
    assert (
        cli.main(cli.get_args_parser().parse_args([*base, "--dataset", "sop", "--root", str(missing)])) == 2
    )
    assert "Ebay_train.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not fit mbf"):
        cli.main(
            cli.get_args_parser().parse_args(
                [*base, "--dataset", "cub", "--root", str(cub_root), "--model-name", "mbf"]
            )
        )
    bad = tmp_path / "bad.pt"
    torch.save([1, 2], bad)
    with pytest.raises(SystemExit, match="expected a state_dict"):
        cli.main(
            cli.get_args_parser().parse_args(
                ["--model", str(bad), "--dataset", "cub", "--root", str(cub_root)]
            )
        )
