"""ONNX export of face backbones that onnxruntime and insightface's model zoo run as they are.

The exported graph takes ``data``: float32 ``(N, 3, 112, 112)`` RGB images scaled as
``(x - 127.5) / 127.5`` and returns one output, ``embedding``: the un-normalised ``(N, D)`` embedding.
The normalisation is deliberately not in the graph: insightface's ``ArcFaceONNX`` looks at the names of
the first nodes and, when it finds none that look like a subtraction and a multiplication, normalises
the input itself with mean 127.5 and std 127.5, which is exactly this convention. The batch axis is a
real dynamic axis (``torch.export`` with a symbolic batch dimension); height and width are static, as
insightface's router requires (square, at least 112, divisible by 16).

Export uses the ``torch.export`` based exporter (``torch.onnx.export(dynamo=True)``), the one PyTorch
maintains. Its operator implementations start at opset 18; a lower ``opset`` is reached by the ONNX
version converter and may fail for some graphs.

After writing, :func:`export_onnx` runs ``onnx.checker`` (full check) and compares onnxruntime with the
PyTorch model on random inputs and on synthetic faces, at batch 1 and 8 (or the fixed batch): the largest
absolute difference must be at most ``1e-4`` times the largest absolute embedding value (``5e-3`` for
the fp16 variant, whose weights and activations are half precision). The file is written to a
temporary name in the destination folder and renamed into place only when every check passes.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import facems
from facems.data.transforms import normalize_faces

__all__ = ["ExportError", "ExportReport", "OnnxBackbone", "export_onnx", "onnx_parity"]

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3}
FP16_NOTE = (
    "fp16 weights and activations with fp32 input, output and embedding head: onnxruntime and insightface "
    "2.1's model_zoo (ArcFaceONNX) run it (tested), at about 1e-3 of the fp32 embedding's scale; keep the "
    "fp32 file as the reference, since model checkers that require fp32 initialisers reject this one"
)


class ExportError(RuntimeError):
    """The export failed, or the written graph does not match the PyTorch model."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured.

    Attributes:
        path: the ONNX file.
        network: the backbone's registered name.
        opset: the default-domain opset of the written graph.
        batch: ``"dynamic"`` or the fixed batch size.
        fp16: whether weights are fp16.
        size_bytes: file size.
        max_abs_diff: largest |onnxruntime - torch| per check (``"random@8"``, ``"faces@1"``, ...).
        max_abs_embedding: largest |torch embedding| over the checks (the scale of the tolerance).
        tolerance: allowed ``max_abs_diff / max_abs_embedding``.
        metadata: the metadata properties written into the file.
    """

    path: str
    network: str
    opset: int
    batch: str | int
    fp16: bool
    size_bytes: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_abs_embedding: float = 0.0
    tolerance: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def relative_error(self) -> float:
        """Worst ``max_abs_diff`` over the checks, divided by ``max_abs_embedding``."""
        worst = max(self.max_abs_diff.values(), default=0.0)
        return worst / max(self.max_abs_embedding, 1e-12)


class _Fp16Wrapper(nn.Module):
    """fp32 in and out, fp16 inside: the fp16 variant keeps insightface's fp32 input contract.

    The embedding head (the modules the backbones run in fp32 under autocast: ``fc``, ``features``,
    ``conv_sep``) stays fp32; every other leaf module is fp16 and casts its input to fp16.
    """

    FP32_HEADS = ("fc", "features", "conv_sep")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()
        for name in self.FP32_HEADS:
            head = getattr(self.model, name, None)
            if isinstance(head, nn.Module):
                head.float()
        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            if params and not list(module.children()):
                module.register_forward_pre_hook(_cast_input_hook(params[0].dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _cast_input_hook(dtype: torch.dtype) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )

    return hook


def _check_batch(batch: str | int) -> None:
    if batch != "dynamic" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch: expected 'dynamic' or a positive int, got {batch!r}")


def _synthetic_faces(n: int, seed: int = 0) -> np.ndarray:
    """``n`` synthetic aligned faces, uint8 RGB ``(n, 3, 112, 112)``."""
    from facems.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(num_identities=max(1, n), images_per_identity=1, seed=seed)
    return np.stack([faces[i][0].transpose(2, 0, 1) for i in range(n)])


def onnx_parity(
    path: str, model: nn.Module, batches: tuple[int, ...] = (1, 8), seed: int = 0
) -> tuple[dict[str, float], float]:
    """Largest |onnxruntime - torch| per check, and the largest |torch embedding| (CPU, fp32 model).

    Checks: ``random@B`` (uniform inputs in [-1, 1]) and ``faces@B`` (synthetic faces normalised as
    the graph expects) for each batch size ``B``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    faces = torch.from_numpy(_synthetic_faces(max(batches), seed))
    diffs: dict[str, float] = {}
    scale = 0.0
    for b in batches:
        inputs = {
            f"random@{b}": torch.rand(b, 3, 112, 112, generator=gen) * 2 - 1,
            f"faces@{b}": normalize_faces(faces[:b]),
        }
        for name, x in inputs.items():
            with torch.inference_mode():
                ref = model(x).float().numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
            if got.shape != ref.shape:
                raise ExportError(f"{path}: {name}: onnxruntime output {got.shape}, torch {ref.shape}")
            diffs[name] = float(np.abs(got.astype(np.float64) - ref).max())
            scale = max(scale, float(np.abs(ref).max()))
    return diffs, scale


def export_onnx(
    model: nn.Module,
    path: str,
    network: str,
    opset: int = 18,
    batch: str | int = "dynamic",
    fp16: bool = False,
    verify: bool = True,
) -> ExportReport:
    """Export ``model`` (a backbone taking normalised 112x112 RGB) to ``path`` and check it.

    Args:
        model: the backbone; it is copied to the CPU in eval mode (the argument is left as it was).
        path: destination ``.onnx`` file; written only when every check passes.
        network: its registered name, stored in the metadata.
        opset: ONNX default-domain opset (18 is the exporter's own; lower ones are converted).
        batch: ``"dynamic"`` for a dynamic batch axis, or a fixed batch size.
        fp16: write fp16 weights and activations (input and output stay fp32).
        verify: run the onnxruntime parity checks.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: a bad argument.
        ExportError: export, ``onnx.checker`` or the parity check failed; ``path`` is left untouched.
    """
    import onnx

    _check_batch(batch)
    if opset < 13:
        raise ValueError(f"opset: expected at least 13, got {opset}")
    ref = _cpu_eval_copy(model)
    num_features = int(ref(torch.zeros(2, 3, 112, 112)).shape[1])
    export_model: nn.Module = _Fp16Wrapper(_cpu_eval_copy(ref)) if fp16 else ref
    example = torch.zeros(2 if batch == "dynamic" else int(batch), 3, 112, 112)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if batch == "dynamic" else None
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    export_model,
                    (example,),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    opset_version=opset,
                    dynamo=True,
                    dynamic_shapes=dynamic,
                    external_data=False,
                    verbose=False,
                )
            except Exception as e:
                raise ExportError(f"torch.onnx.export of {network} failed: {type(e).__name__}: {e}") from e
            if program is None:
                raise ExportError(f"torch.onnx.export of {network} returned no program")
            program.save(tmp, external_data=False)
        proto = onnx.load(tmp)
        metadata = {
            "facems_version": facems.__version__,
            "network": network,
            "embedding_size": str(num_features),
            "input_mean": "127.5",
            "input_std": "127.5",
            "color_order": "RGB",
            "layout": "NCHW",
            "input_size": "112x112",
            "weights": "fp16" if fp16 else "fp32",
            "batch": str(batch),
        }
        del proto.metadata_props[:]
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"facems {network} face embedding; input (x - 127.5) / 127.5 RGB NCHW"
        onnx.save(proto, tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejects the exported {network}: {e}") from None
        written_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
        report = ExportReport(
            path=path,
            network=network,
            opset=int(written_opset),
            batch=batch,
            fp16=fp16,
            size_bytes=os.path.getsize(tmp),
            tolerance=TOLERANCE["fp16" if fp16 else "fp32"],
            metadata=metadata,
        )
        if verify:
            batches = (1, 8) if batch == "dynamic" else (int(batch),)
            report.max_abs_diff, report.max_abs_embedding = onnx_parity(tmp, ref, batches)
            if report.relative_error > report.tolerance:
                raise ExportError(
                    f"onnxruntime differs from torch by {max(report.max_abs_diff.values()):.3g} "
                    f"(embeddings up to {report.max_abs_embedding:.3g}): relative {report.relative_error:.3g} "
                    f"> {report.tolerance:g}; per check {report.max_abs_diff}"
                )
        os.replace(tmp, path)
        return report
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    import copy

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    out = copy.deepcopy(model).cpu().float().eval()
    return out.to(memory_format=torch.contiguous_format)


class OnnxBackbone(nn.Module):
    """An exported ``.onnx`` backbone run by onnxruntime behind the ``nn.Module`` interface.

    ``forward`` takes the same normalised float input as the PyTorch backbone and returns its embedding,
    so :func:`facems.embed.embed_images` and the evaluators use ONNX files unchanged (on the CPU
    provider unless ``providers`` says otherwise). It has no parameters and no gradients.
    """

    def __init__(self, path: str, providers: list[Any] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(outputs) != 1:
            raise ExportError(f"{path}: expected one output (the embedding), got {len(outputs)}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = x.detach().float().contiguous().cpu().numpy()
        out = self.session.run([self.output_name], {self.input_name: data})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)
