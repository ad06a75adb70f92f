"""eval/ijbc.py end to end on a tiny synthetic IJB-C-like release, with a tiny random model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_ijbc_like
from facems.models import create_model
from facems.protocols import ijb

REPO = Path(__file__).resolve().parents[1]


def _load_cli() -> ModuleType:
    """eval/ijbc.py as a module (the eval folder is not a package)."""
    spec = importlib.util.spec_from_file_location("facems_eval_ijbc", REPO / "eval" / "ijbc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny IJB-C-like release (45 faces) and a tiny random model saved as a state_dict."""
    root = tmp_path_factory.mktemp("ijbc_cli")
    counts = write_ijbc_like(str(root), SyntheticFaces(6, 18, 0, identity_offset=3_000_000), seed=0)
    torch.manual_seed(0)
    model = create_model("iresnet_tiny")
    weights = root / "model.pt"
    torch.save(model.state_dict(), weights)
    return {"root": root, "counts": counts, "model": model.eval(), "weights": weights}


@pytest.fixture(scope="module")
def first_run(release: dict[str, Any]) -> dict[str, Any]:
    """One CLI run in a subprocess that embeds every face."""
    results = release["root"] / "results"
    cmd = [
        sys.executable,
        str(REPO / "eval" / "ijbc.py"),
        "--model",
        str(release["weights"]),
        "--image-path",
        str(release["root"] / "IJBC"),
        "--result-dir",
        str(results),
        "--job",
        "run1",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "2"}
    )
    return {**release, "results": results, "proc": proc}


@pytest.mark.slow
def test_cli_prints_tables_and_writes_scores_json_and_roc(first_run: dict[str, Any]) -> None:
    proc, counts, results = first_run["proc"], first_run["counts"], first_run["results"]
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        f"| meta files | {counts['faces']} | {counts['templates']} | {counts['pairs']} "
        f"| {counts['genuine']} | {counts['pairs'] - counts['genuine']} |" in out
    )
    assert f"warning: IJBC: {counts['faces']} images, the official release has 469,375" in out
    assert "| run1-IJBC (N1D1F1) | 1e-06 | 1e-05 | 1e-04 | 1e-03 | 1e-02 | 1e-01 |" in out
    caches = list(results.glob("ijbc_features_*.npz"))
    assert len(caches) == 1
    run = results / "run1"
    assert {p.name for p in run.iterdir()} >= {
        "ijbc.npy",
        "ijbc.json",
        "ijbc_roc.csv",
        "ijbc_roc.png",
        "ijbc_roc.pdf",
    }
    payload = json.loads((run / "ijbc.json").read_text())
    assert payload["features_from_cache"] is False and payload["test_mode"] == "N1D1F1"
    assert payload["counts"]["images"] == counts["faces"] and payload["counts"]["pairs"] == counts["pairs"]

    # The cached embeddings are the model's, and the reported numbers follow from them.
    meta = ijb.read_ijb_meta(first_run["root"] / "IJBC")
    with np.load(caches[0]) as z:
        emb, flip = z["emb"], z["flip_emb"]
    want_emb, want_flip = ijb.extract_features(
        first_run["model"],
        first_run["root"] / "IJBC" / "loose_crop",
        meta.names,
        meta.landmarks,
        num_workers=0,
    )
    tol = 1e-5 * float(np.abs(want_emb).max())
    np.testing.assert_allclose(emb, want_emb, atol=tol)
    np.testing.assert_allclose(flip, want_flip, atol=tol)
    want = ijb.evaluate_ijb(meta, emb, flip)
    np.testing.assert_array_equal(np.load(run / "ijbc.npy"), want.scores)
    assert payload["tar_at_far"] == want.to_dict()["tar_at_far"]
    assert payload["identification"] == want.to_dict()["identification"]
    assert ijb.format_tar_table(want.tar, "run1-IJBC (N1D1F1)") in out
    assert want.identification is not None
    assert ijb.format_identification_table(want.identification) in out
    roc = np.loadtxt(run / "ijbc_roc.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(roc[:, :2], np.c_[want.tar.fpr, want.tar.tpr], rtol=1e-9)


@pytest.mark.slow
def test_cli_rerun_with_other_switches_reads_the_cache_and_runs_no_model(
    first_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert first_run["proc"].returncode == 0, first_run["proc"].stderr
    cli = _load_cli()

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not run when the features are cached")

    monkeypatch.setattr(cli, "load_backbone", no_model)
    monkeypatch.setattr(ijb, "extract_features", no_model)
    root, results = first_run["root"], first_run["results"]
    args = cli.get_args_parser().parse_args(
        [
            "--model",
            str(first_run["weights"]),
            "--image-path",
            str(root / "IJBC"),
            "--result-dir",
            str(results),
            "--job",
            "run2",
            "--no-use-flip-test",
            "--no-use-detector-score",
        ]
    )
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "read from the cache" in out and "| run2-IJBC (N1D0F0) |" in out
    payload = json.loads((results / "run2" / "ijbc.json").read_text())
    assert payload["features_from_cache"] is True
    assert payload["switches"] == {
        "use_flip_test": False,
        "use_norm_score": True,
        "use_detector_score": False,
    }
    meta = ijb.read_ijb_meta(root / "IJBC")
    (cache,) = results.glob("ijbc_features_*.npz")
    with np.load(cache) as z:
        want = ijb.evaluate_ijb(meta, z["emb"], z["flip_emb"], use_flip_test=False, use_detector_score=False)
    np.testing.assert_array_equal(np.load(results / "run2" / "ijbc.npy"), want.scores)
    assert not np.array_equal(want.scores, np.load(results / "run1" / "ijbc.npy"))


def test_cli_ijbb_layout_and_errors(
    release: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli = _load_cli()
    src = release["root"] / "IJBC" / "meta"
    meta_dir = tmp_path / "IJBB" / "meta"
    meta_dir.mkdir(parents=True)
    renames = {"_1N_gallery_G1": "_1N_gallery_S1", "_1N_gallery_G2": "_1N_gallery_S2"}
    for f in src.iterdir():
        name = f.name.replace("ijbc", "ijbb")
        for a, b in renames.items():
            name = name.replace(a, b)
        shutil.copy(f, meta_dir / name)
    rng = np.random.default_rng(0)

    def fake_features(model: object, image_dir: object, names: list[str], *a: object, **k: object) -> Any:
        return rng.standard_normal((2, len(names), 8)).astype(np.float32)

    monkeypatch.setattr(cli, "load_backbone", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(ijb, "extract_features", fake_features)
    base = ["--model", str(release["weights"]), "--result-dir", str(tmp_path / "res")]
    args = cli.get_args_parser().parse_args(
        [*base, "--image-path", str(tmp_path / "IJBB"), "--target", "IJBB"]
    )
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "the official release has 227,630" in out and "| S1 |" in out and "| S2 |" in out
    assert (tmp_path / "res" / "facems" / "ijbb.json").is_file()

    args = cli.get_args_parser().parse_args([*base, "--image-path", str(tmp_path / "nowhere")])
    assert cli.main(args) == 2
    assert "ijbc_face_tid_mid.txt: no such file" in capsys.readouterr().err
