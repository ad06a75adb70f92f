"""Backbone weights from facems and insightface files, with the network inferred from the keys.

Accepted files (all read with ``torch.load(weights_only=True)``: nothing in them is executed):

* a backbone ``state_dict``: facems' ``model.pt`` / ``model_best.pt``, insightface arcface_torch's
  ``model.pt`` or ``backbone.pth``; keys may carry DDP's ``module.`` or ``torch.compile``'s
  ``_orig_mod.`` prefix, tensors may be fp16 or bf16 (they are loaded as fp32);
* a facems training checkpoint (``checkpoint_last.pt``): the backbone and its stored config
  (network name and embedding size);
* an arcface_torch training checkpoint (``checkpoint_gpu_0.pt``) holding ``state_dict_backbone``.

The network is read from the keys when no name is given: iResNets by their number of blocks per stage
(18: 2/2/2/2, 34: 3/4/6/3, 50: 3/4/14/3, 100: 3/13/30/3, 200: 6/26/60/6) and stem width (16 for
``iresnet_tiny``; ``iresnet_tiny_s2`` by its 4x4 final map; 8 for ``iresnet_nano_s2``), MobileFaceNet (``mbf``) by its ``layers.*`` keys; the embedding size by the last
BatchNorm1d (``features``). Loading is strict: a missing or unexpected key is an error that names them.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from facems.models.registry import create_model

__all__ = ["WeightsError", "infer_network", "load_backbone", "open_backbone", "read_backbone_state"]

IRESNET_STAGES: dict[tuple[int, ...], str] = {
    (2, 2, 2, 2): "iresnet18",
    (3, 4, 6, 3): "iresnet34",
    (3, 4, 14, 3): "iresnet50",
    (3, 13, 30, 3): "iresnet100",
    (6, 26, 60, 6): "iresnet200",
}
_PREFIXES = ("module.", "_orig_mod.")
_STAGE_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


class WeightsError(ValueError):
    """A weights file that cannot be used as a backbone; the message names the file and the problem."""


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def read_backbone_state(
    path: str | os.PathLike[str],
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    """The backbone ``state_dict`` in ``path`` (fp32, prefixes removed) and what the file says of the network.

    Returns:
        ``(state, info)``: ``info`` holds ``name`` and ``num_features`` when the file is a facems training
        checkpoint (from its stored config), else it is empty.

    Raises:
        WeightsError: the file is missing, does not load with ``weights_only=True``, or holds no
            ``str -> tensor`` mapping.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise WeightsError(f"{where}: no such file")
    try:
        obj = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle/unpickling/zip errors of several types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"{where}: does not load as weights (torch.load weights_only=True): {first}"
        ) from None
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "format" in obj:
        info = _stored_network(where, obj.get("config"))
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict_backbone"), Mapping):
        obj = obj["state_dict_backbone"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{where}: expected a state_dict (a non-empty dict of tensors), got {type(obj).__name__}"
        )
    bad = [
        k
        for k, v in obj.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.is_complex()
    ]
    if bad:
        raise WeightsError(
            f"{where}: entries that are not str -> real tensor: {', '.join(repr(k)[:80] for k in bad[:5])}"
        )
    state = OrderedDict(
        (k, v.float() if v.is_floating_point() and v.dtype != torch.float32 else v)
        for k, v in _strip_prefixes(obj).items()
    )
    return state, info


def _stored_network(where: str, config: Any) -> dict[str, Any]:
    """``name`` and ``num_features`` from a facems checkpoint's stored config (those it has).

    Raises:
        WeightsError: the config, or its ``model`` section, is there but not a mapping, or holds a name
            that is not a string or an embedding size that is not a positive int.
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise WeightsError(
            f"{where}: the checkpoint's config is a {type(config).__name__}, expected a mapping"
        )
    model_cfg = config.get("model")
    if model_cfg is None:
        return {}
    if not isinstance(model_cfg, Mapping):
        raise WeightsError(
            f"{where}: the checkpoint's config 'model' is a {type(model_cfg).__name__}, expected a mapping"
        )
    info = {k: model_cfg[k] for k in ("name", "num_features") if k in model_cfg}
    if "name" in info and not isinstance(info["name"], str):
        raise WeightsError(f"{where}: config model.name: expected a model name, got {info['name']!r:.80}")
    n = info.get("num_features", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise WeightsError(f"{where}: config model.num_features: expected a positive int, got {n!r:.80}")
    return info


def infer_network(state: Mapping[str, torch.Tensor], where: str = "state_dict") -> tuple[str, int]:
    """``(model name, embedding size)`` of a backbone ``state_dict`` in insightface's key layout.

    Raises:
        WeightsError: the keys match no known network.
    """
    features = state.get("features.weight")
    if features is None and "features.layers.3.weight" in state:  # mbf: GDC ends in BatchNorm1d
        features = state["features.layers.3.weight"]
    if features is None or features.dim() != 1:
        raise WeightsError(
            f"{where}: no 'features' BatchNorm1d weight: not an iResNet or MobileFaceNet state_dict"
        )
    num_features = int(features.shape[0])
    if "conv1.weight" not in state:
        if any(k.startswith("layers.") for k in state):
            return "mbf", num_features
        raise WeightsError(f"{where}: neither 'conv1.weight' (iResNet) nor 'layers.*' keys (MobileFaceNet)")
    blocks = [0, 0, 0, 0]
    for key in state:
        m = _STAGE_KEY.match(key)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
    name = IRESNET_STAGES.get(tuple(blocks))
    if name is None:
        known = ", ".join(f"{n} {'/'.join(map(str, b))}" for b, n in IRESNET_STAGES.items())
        raise WeightsError(
            f"{where}: iResNet with {'/'.join(map(str, blocks))} blocks per stage; known: {known}"
        )
    if state["conv1.weight"].dim() != 4 or ("fc.weight" in state and state["fc.weight"].dim() != 2):
        raise WeightsError(f"{where}: 'conv1.weight' is not 4-D or 'fc.weight' is not 2-D: not an iResNet")
    width = int(state["conv1.weight"].shape[0])
    fc_in = int(state["fc.weight"].shape[1]) if "fc.weight" in state else 0
    if name == "iresnet18" and width == 16:
        name = "iresnet_tiny_s2" if fc_in == 128 * 4 * 4 else "iresnet_tiny"  # stride-2 stem: 4x4 final map
    elif name == "iresnet18" and width == 8 and fc_in == 64 * 4 * 4:
        name = "iresnet_nano_s2"
    elif width != 64:
        raise WeightsError(
            f"{where}: {name} stages with stem width {width}; expected 64 (16 for iresnet_tiny, "
            "8 for iresnet_nano_s2)"
        )
    return name, num_features


def load_backbone(
    path: str | os.PathLike[str], name: str | None = None, num_features: int | None = None
) -> nn.Module:
    """Build the backbone stored in ``path`` and load its weights (strict), in eval mode on the CPU.

    An ``.onnx`` file gives a :class:`facems.export.onnx.OnnxBackbone` (onnxruntime behind the same
    interface); ``name`` and ``num_features`` are then ignored. See :func:`open_backbone` for the rest.
    """
    if os.fspath(path).endswith(".onnx"):
        from facems.export.onnx import OnnxBackbone

        if not os.path.isfile(path):
            raise WeightsError(f"{os.fspath(path)}: no such file")
        return OnnxBackbone(os.fspath(path))
    return open_backbone(path, name, num_features)[0]


def open_backbone(
    path: str | os.PathLike[str], name: str | None = None, num_features: int | None = None
) -> tuple[nn.Module, str, int]:
    """``(model, name, num_features)``: the backbone in ``path`` with its weights (strict), eval mode, CPU.

    Args:
        path: see the module docstring for the accepted files.
        name: a registered model name; ``None`` infers it (from a checkpoint's config, else the keys).
        num_features: embedding size; ``None`` infers it likewise.

    Raises:
        WeightsError: unreadable file, unknown network, or keys/shapes that do not fit ``name``
            (the message lists the missing and unexpected keys, or the shape mismatches).
    """
    where = os.fspath(path)
    state, info = read_backbone_state(where)
    if name is None or num_features is None:
        inferred_name, inferred_features = (
            (info["name"], info["num_features"]) if len(info) == 2 else infer_network(state, where)
        )
        name = name or inferred_name
        num_features = num_features or inferred_features
    try:
        model = create_model(name, num_features=num_features)
    except (ValueError, TypeError, RuntimeError) as e:  # unknown name; a size the layers refuse
        raise WeightsError(
            f"{where}: cannot build {name!r:.80} with num_features={num_features!r:.80}: {e}"
        ) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{where}: does not fit {name} (num_features={num_features}): "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if shapes:
        raise WeightsError(
            f"{where}: does not fit {name} (num_features={num_features}); shapes: {shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), name, num_features
