"""ONNX export: the file's contract, onnxruntime parity, and insightface's model zoo running it as it is."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from facems.data.synthetic import SyntheticFaces
from facems.data.transforms import normalize_faces
from facems.embed import embed_images
from facems.export import onnx as fx
from facems.models import create_model, load_backbone

pytestmark = pytest.mark.slow  # each export runs torch.export: about 15 s on 2 CPU cores


def _randomised(name: str, num_features: int = 512, seed: int = 0) -> torch.nn.Module:
    """A backbone whose BatchNorm statistics are not the identity, so parity is not trivially met."""
    torch.manual_seed(seed)
    model = create_model(name, num_features=num_features)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, fx.ExportReport]:
    model = _randomised("iresnet_tiny")
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return model, path, fx.export_onnx(model, str(path), "iresnet_tiny")


def test_file_contract(exported: tuple[torch.nn.Module, Path, fx.ExportReport]) -> None:
    _, path, report = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"]  # one file, no side data
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert inp.name == "data" and out.name == "embedding"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # a real dynamic axis
    assert [d.dim_value for d in dims[1:]] == [3, 112, 112]
    floats = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
    assert {i.data_type for i in proto.graph.initializer} & floats == {onnx.TensorProto.FLOAT}  # fp32 weights
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input_mean"] == "127.5" and meta["input_std"] == "127.5" and meta["color_order"] == "RGB"
    assert meta["embedding_size"] == "512" and meta["network"] == "iresnet_tiny" and "facems_version" in meta
    # No normalisation in the graph: no Sub or Mul among the first nodes (insightface's heuristic).
    assert not any(n.op_type in ("Sub", "Mul") for n in proto.graph.node[:8])
    assert set(report.max_abs_diff) == {"random@1", "faces@1", "random@8", "faces@8"}
    assert report.relative_error <= 1e-4


def test_onnxruntime_matches_torch_at_other_batch_sizes(
    exported: tuple[torch.nn.Module, Path, fx.ExportReport],
) -> None:
    import onnxruntime as ort

    model, path, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    got = sess.run(["embedding"], {"data": x.numpy()})[0]
    with torch.inference_mode():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_insightface_model_zoo_runs_it(exported: tuple[torch.nn.Module, Path, fx.ExportReport]) -> None:
    from insightface.model_zoo import ArcFaceONNX, get_model

    model, path, _ = exported
    rec = get_model(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(rec, ArcFaceONNX)
    assert (rec.input_mean, rec.input_std) == (127.5, 127.5)  # it normalises, once
    faces = SyntheticFaces(num_identities=3, images_per_identity=1, seed=4)
    rgb = np.stack([faces[i][0] for i in range(3)])
    bgr = [cv2.cvtColor(img, cv2.COLOR_RGB2BGR) for img in rgb]
    with torch.inference_mode():
        ref = model(normalize_faces(torch.from_numpy(rgb).permute(0, 3, 1, 2))).numpy()
    for i, img in enumerate(bgr):
        feat = rec.get_feat(img).ravel()
        assert np.abs(feat - ref[i]).max() <= 1e-4 * np.abs(ref).max()
    batch = rec.get_feat(bgr)
    assert np.abs(batch - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_backbone_in_embed_images(exported: tuple[torch.nn.Module, Path, fx.ExportReport]) -> None:
    model, path, _ = exported
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 112, 112), dtype=np.uint8)
    onnx_model = load_backbone(path)
    assert isinstance(onnx_model, fx.OnnxBackbone)
    got = embed_images(onnx_model, images, batch_size=4, flip=True, distributed=False)
    ref = embed_images(model, images, batch_size=4, flip=True, distributed=False)
    assert np.abs(got - ref).max() <= 2e-4 * np.abs(ref).max()


def test_fp16_variant(tmp_path: Path) -> None:
    model = _randomised("iresnet_tiny", num_features=128, seed=1)
    report = fx.export_onnx(model, str(tmp_path / "tiny16.onnx"), "iresnet_tiny", fp16=True)
    proto = onnx.load(str(tmp_path / "tiny16.onnx"))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types.values()
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 out
    assert report.metadata["weights"] == "fp16"
    assert 0 < report.relative_error <= fx.TOLERANCE["fp16"]
    from insightface.model_zoo import ArcFaceONNX, get_model

    rec = get_model(str(tmp_path / "tiny16.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(rec, ArcFaceONNX)
    face = SyntheticFaces(num_identities=1, images_per_identity=1, seed=7)[0][0]
    with torch.inference_mode():
        ref = model(normalize_faces(torch.from_numpy(face).permute(2, 0, 1)[None])).numpy()
    feat = rec.get_feat(cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    assert np.abs(feat - ref).max() <= fx.TOLERANCE["fp16"] * np.abs(ref).max()


def test_parity_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fx, "onnx_parity", lambda *a, **k: ({"random@1": 1.0}, 1.0))
    target = tmp_path / "bad.onnx"
    with pytest.raises(fx.ExportError, match="differs from torch"):
        fx.export_onnx(_randomised("iresnet_tiny", 64), str(target), "iresnet_tiny", batch=2)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_export_script_fixed_batch_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_onnx_script", Path("scripts/export_onnx.py"))
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = _randomised("iresnet_tiny", num_features=64, seed=2)
    torch.save({"module." + k: v.half() for k, v in model.state_dict().items()}, tmp_path / "backbone.pth")
    out = tmp_path / "b1.onnx"
    args = ["--model", str(tmp_path / "backbone.pth"), "--output", str(out), "--batch", "1"]
    assert script.main(script.get_args_parser().parse_args([*args, "--json", str(tmp_path / "r.json")])) == 0
    printed = capsys.readouterr().out
    assert "iresnet_tiny" in printed and "faces@1" in printed
    proto = onnx.load(str(out))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 112, 112]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batch"] == 1 and report["relative_error"] <= 1e-4
    bad = tmp_path / "nope.pt"
    bad.write_bytes(b"not a checkpoint")
    assert script.main(script.get_args_parser().parse_args(["--model", str(bad), "--output", str(out)])) == 2
    assert "does not load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.get_args_parser().parse_args([*args[:4], "--batch", "0"])
