"""facems.protocols.pairs and eval/verification.py against a re-statement of insightface's verification.test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import sklearn.preprocessing
import torch
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold
from torch import nn

from facems.data.binfile import load_bin, save_bin
from facems.data.synthetic import SyntheticFaces
from facems.models import create_model
from facems.protocols import PairResult, evaluate_pairs, verify_bin

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------------------
# An independent re-statement of insightface's recognition/arcface_torch/eval/verification.py (test,
# evaluate, calculate_roc, calculate_accuracy) with explicit loops, without the scipy-broken VAL@FAR.
# ----------------------------------------------------------------------------------------------------


def _accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, issame))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(issame)))
    return float(tp + tn) / dist.size


def _insightface_evaluate(
    embeddings: np.ndarray, issame: np.ndarray, nfolds: int
) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)
    accuracy, best = np.zeros(nfolds), np.zeros(nfolds)
    for k, (train, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(issame)))):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            acc_train[i] = _accuracy(t, dist[train], issame[train])
        j = np.argmax(acc_train)
        best[k] = thresholds[j]
        accuracy[k] = _accuracy(thresholds[j], dist[test], issame[test])
    return accuracy, best


def _insightface_test(
    model: nn.Module, images: np.ndarray, issame: np.ndarray, batch_size: int, nfolds: int
) -> dict[str, Any]:
    """verification.test: both flips embedded batch by batch into float64 arrays, XNorm over both, summed."""
    model.eval()
    data_list = [torch.from_numpy(images), torch.from_numpy(np.ascontiguousarray(images[:, :, :, ::-1]))]
    embeddings_list = []
    with torch.no_grad():
        for data in data_list:
            emb = np.zeros((data.shape[0], 0))
            for ba in range(0, data.shape[0], batch_size):
                out = model(((data[ba : ba + batch_size] / 255) - 0.5) / 0.5).numpy()
                if emb.shape[1] == 0:
                    emb = np.zeros((data.shape[0], out.shape[1]))
                emb[ba : ba + out.shape[0]] = out
            embeddings_list.append(emb)
    xnorm, count = 0.0, 0
    for emb in embeddings_list:
        for row in emb:
            xnorm += float(np.linalg.norm(row))
            count += 1
    embeddings = sklearn.preprocessing.normalize(embeddings_list[0] + embeddings_list[1])
    accuracy, best = _insightface_evaluate(embeddings, issame, nfolds)
    return {
        "accuracy": float(np.mean(accuracy)),
        "std": float(np.std(accuracy)),
        "xnorm": xnorm / count,
        "threshold": float(np.mean(best)),
        "embeddings": embeddings,
    }


def _nearest(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, k = min(zip(abs(fpr - far), range(len(fpr))))
    return float(tpr[k])


def _conservative(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    best = 0.0
    for t in np.unique(scores):
        accept = scores >= t
        if np.mean(accept[~labels]) <= far:
            best = max(best, float(np.mean(accept[labels])))
    return best


# ----------------------------------------------------------------------------------------------------


def _random_pairs(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, dim)) * rng.uniform(5, 30, size=(n, 1))
    b = np.where(issame[:, None], a + 8 * rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) * 20)
    emb = np.empty((2 * n, dim))
    emb[0::2], emb[1::2] = a, b
    return emb, issame


def test_evaluate_pairs_equals_insightface_restatement() -> None:
    emb, issame = _random_pairs(3000, 32, seed=0)
    got = evaluate_pairs(emb, issame)
    normed = sklearn.preprocessing.normalize(emb)
    accuracy, best = _insightface_evaluate(normed, issame, 10)
    assert got.accuracy == float(np.mean(accuracy)) and got.std == float(np.std(accuracy))
    assert got.fold_accuracies == tuple(accuracy) and got.fold_thresholds == tuple(best)
    assert got.threshold == float(np.mean(best))
    assert got.xnorm == pytest.approx(float(np.mean([np.linalg.norm(r) for r in emb])), rel=1e-12)
    assert got.num_pairs == 3000
    scores = np.array([float(np.dot(normed[2 * i], normed[2 * i + 1])) for i in range(3000)])
    assert got.tar_at_far_1e3["nearest"] == pytest.approx(_nearest(issame, scores, 1e-3), abs=1e-12)
    assert got.tar_at_far_1e3["conservative"] == pytest.approx(_conservative(issame, scores, 1e-3), abs=1e-12)
    assert (
        0.6 < got.accuracy < 1.0
        and 0.0 < got.tar_at_far_1e3["conservative"] <= got.tar_at_far_1e3["nearest"] + 1e-12
    )
    json.dumps(got.to_dict())  # JSON-serialisable


def test_evaluate_pairs_rejects_bad_input() -> None:
    emb, issame = _random_pairs(20, 4, seed=1)
    with pytest.raises(ValueError, match=r"issame: expected \[20\]"):
        evaluate_pairs(emb, issame[:-1])
    with pytest.raises(ValueError, match=r"\[2n, D\]"):
        evaluate_pairs(emb[:-1], issame)
    emb[5, 0] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        evaluate_pairs(emb, issame)


class _PairNet(nn.Module):
    """A small backbone (BN, mirror-sensitive) for 16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
        )
        self.fc = nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _face_like_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (2n, 3, 16, 16): genuine pairs are noisy copies of one image, impostors independent."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    base = rng.integers(0, 256, size=(n, 3, 16, 16))
    other = np.where(issame[:, None, None, None], base, rng.integers(0, 256, size=(n, 3, 16, 16)))
    noisy = np.clip(other + rng.normal(0, 40, size=other.shape), 0, 255)
    images = np.empty((2 * n, 3, 16, 16), dtype=np.uint8)
    images[0::2], images[1::2] = base, noisy.astype(np.uint8)
    return images, issame


def test_verify_bin_equals_insightface_test_on_loaded_pairs() -> None:
    images, issame = _face_like_pairs(200, seed=2)
    model = _PairNet()
    model.train()
    # 400 images in batches of 50: the reference runs the very same batches
    got = verify_bin(model, (images, issame), batch_size=50)
    assert model.training
    want = _insightface_test(_PairNet(), images, issame, batch_size=50, nfolds=10)
    assert got.accuracy == want["accuracy"] and got.std == want["std"] and got.threshold == want["threshold"]
    assert got.xnorm == pytest.approx(want["xnorm"], rel=1e-12)
    assert got.accuracy > 0.7  # the pairs are separable, so a failure to pair rows would show
    normed = want.pop("embeddings")
    scores = np.sum(normed[0::2] * normed[1::2], axis=1)
    assert got.tar_at_far_1e3["nearest"] == _nearest(issame, scores, 1e-3)
    assert got.tar_at_far_1e3["conservative"] == _conservative(issame, scores, 1e-3)


@pytest.fixture(scope="module")
def synthetic_bin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """calfw.bin of 20 synthetic pairs (10 genuine, 10 impostor) at 112x112."""
    faces = SyntheticFaces(num_identities=30, images_per_identity=2, seed=5, identity_offset=1_000_000)
    img = [faces[i][0] for i in range(len(faces))]
    images, issame = [], []
    for k in range(10):
        images += [img[2 * k], img[2 * k + 1]]  # identity k twice
        images += [img[2 * (10 + k)], img[2 * (20 + k)]]  # two other identities
        issame += [True, False]
    arr = np.stack(images).transpose(0, 3, 1, 2).copy()
    root = tmp_path_factory.mktemp("bins")
    save_bin(root / "calfw.bin", arr, np.array(issame))
    return root, arr, np.array(issame)


def test_verify_bin_reads_a_path_like_load_bin(synthetic_bin: tuple[Path, np.ndarray, np.ndarray]) -> None:
    root, images, issame = synthetic_bin
    model = _PairNet()
    from_path = verify_bin(model, root / "calfw.bin", nfolds=5)
    loaded = load_bin(root / "calfw.bin")
    np.testing.assert_array_equal(loaded[1], issame)
    assert isinstance(from_path, PairResult) and from_path == verify_bin(model, loaded, nfolds=5)
    assert from_path.num_pairs == 20 and len(from_path.fold_accuracies) == 5
    with pytest.raises(ValueError, match="bin_path_or_loaded"):
        verify_bin(model, (images,))  # type: ignore[arg-type]


@pytest.mark.slow
def test_cli_prints_tables_and_writes_json(
    synthetic_bin: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    root, _, _ = synthetic_bin
    torch.manual_seed(0)
    model = create_model("iresnet_tiny")
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "res" / "verification.json"
    cmd = [
        sys.executable,
        str(REPO / "eval" / "verification.py"),
        "--model",
        str(weights),
        "--bins",
        str(root),
        "--targets",
        "calfw",
        "--model-name",
        "iresnet_tiny",
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
    assert payload["model_name"] == "iresnet_tiny" and payload["flip"] is True
    res = payload["results"]["calfw"]
    want = verify_bin(model, root / "calfw.bin", batch_size=16)
    assert res["accuracy"] == want.accuracy and res["std"] == want.std and res["num_pairs"] == 20
    assert res["xnorm"] == pytest.approx(want.xnorm, rel=1e-5)
    assert res["tar_at_far_1e3"] == want.tar_at_far_1e3
    row = f"| {want.accuracy * 100:.2f}+-{want.std * 100:.2f} | {want.xnorm:.4f} | {want.threshold:.4f} |"
    assert "### calfw (20 pairs)" in proc.stdout and row in proc.stdout


def _load_cli() -> ModuleType:
    """eval/verification.py as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "facems_eval_verification", REPO / "eval" / "verification.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors_name_the_problem(
    synthetic_bin: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, _ = synthetic_bin
    cli = _load_cli()
    weights = tmp_path / "model.pt"
    torch.save(create_model("iresnet_tiny").state_dict(), weights)
    base = ["--model", str(weights), "--bins", str(root), "--device", "cpu"]
    assert cli.main(cli.get_args_parser().parse_args([*base, "--targets", "calfw", "lfw"])) == 2
    assert "lfw.bin" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not fit mbf"):
        cli.main(cli.get_args_parser().parse_args([*base, "--targets", "calfw", "--model-name", "mbf"]))
    torch.save([1, 2], weights)
    with pytest.raises(SystemExit, match="expected a state_dict"):
        cli.main(cli.get_args_parser().parse_args([*base, "--targets", "calfw"]))
