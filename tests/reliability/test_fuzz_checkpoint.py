"""Property tests: hostile and broken checkpoints and weight files (facems.train.checkpoint,
facems.models.loading).

A damaged file either loads as exactly what was saved or is refused with the library's error
(CheckpointError / WeightsError) naming the file; random state dicts either build a model whose weights
are the file's or are refused with WeightsError; and ``__reduce__`` payloads that would create a file
are refused, in both torch formats and through every loading entry point, without creating it.
"""

from __future__ import annotations

import builtins
import io
import os
import pathlib
import pickle
import subprocess
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _fuzz import Draw, fuzz_settings
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from facems.config import config_to_dict, load_config
from facems.models import create_model
from facems.models.loading import WeightsError, load_backbone, read_backbone_state
from facems.train.checkpoint import CheckpointError, CheckpointManager, atomic_save, load_checkpoint

pytestmark = [
    pytest.mark.timeout(180),
    # torch's own notes on what the fuzzer feeds it: not failures.
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:'torch.load' received a zip file that looks like a TorchScript:UserWarning"
    ),
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
]

FUZZ = fuzz_settings(80)


def _small_state() -> dict[str, Any]:
    """A training checkpoint of the real layout, small: a tiny net, its optimizer, config, RNG."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return {
        "format": 1,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 7,
        "progress": {"best_score": 0.5, "best_step": None},
        "config": config_to_dict(load_config()),
        "rng": {"torch": torch.get_rng_state()},
    }


STATE = _small_state()


def _bytes_of(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


SEEDS = {"zip": _bytes_of(STATE), "legacy": _bytes_of(STATE, legacy=True)}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def _mutate_bytes(draw: Draw, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(buf) - 1)) if buf else 0
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "zero_run"]))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 64))]
        elif kind == "zero_run":
            n = draw(st.integers(1, 4096))
            buf[pos : pos + n] = bytes(len(buf[pos : pos + n]))
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------
# Damaged files: loaded exactly, or refused naming the file
# ---------------------------------------------------------------------------------------------------


@FUZZ
@given(fmt=st.sampled_from(["zip", "legacy"]), data=st.data())
def test_damaged_checkpoint_loads_exactly_or_is_refused(
    tmp_path: Path, fmt: str, data: st.DataObject
) -> None:
    path = tmp_path / "checkpoint_last.pt"
    path.write_bytes(_mutate_bytes(data.draw, SEEDS[fmt]))
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        event(f"{fmt}: refused")
        assert str(path) in str(e), str(e)
    else:
        # zip: CRC-32 of every member guards the bytes; legacy files have no checksum, so a damaged
        # legacy file may load, but then it is a dict of plain values (the weights_only contract).
        same = _equal(state, STATE)
        event(f"{fmt}: loaded, {'equal to' if same else 'different from'} what was saved")
        if fmt == "zip":
            assert same, "a damaged zip checkpoint loaded as something else"
        else:
            assert isinstance(state, dict)


def _rezip(data: bytes, edit: Callable[[str, bytes], bytes]) -> bytes:
    """The archive with each member's bytes replaced by ``edit(name, bytes)``; CRCs recomputed."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, edit(info.filename, src.read(info.filename)))
    return out.getvalue()


@FUZZ
@given(data=st.data())
def test_mutated_pickle_inside_a_valid_zip(tmp_path: Path, data: st.DataObject) -> None:
    """Past the CRC check: the pickle itself (data.pkl) is damaged and the archive rebuilt."""
    mutated = _rezip(
        SEEDS["zip"], lambda name, b: _mutate_bytes(data.draw, b) if name.endswith("data.pkl") else b
    )
    path = tmp_path / "checkpoint_00000007.pt"
    path.write_bytes(mutated)
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        event("refused")
        assert str(path) in str(e), str(e)
    else:
        event("loaded")
        assert isinstance(state, dict)
    try:
        read_backbone_state(path)
    except WeightsError as e:
        assert str(path) in str(e), str(e)


@FUZZ
@given(data=st.binary(max_size=300) | st.binary(max_size=60).map(lambda b: b"PK\x03\x04" + b))
def test_random_bytes_as_checkpoint_and_weights(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError) as winfo:
        load_backbone(path)
    assert str(path) in str(winfo.value)


def test_manager_falls_back_past_damaged_files(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(STATE, 1)
    for step, raw in ((2, SEEDS["zip"][:-100]), (3, SEEDS["zip"][:5000] + b"\0" * 7 + SEEDS["zip"][5007:])):
        manager.step_path(step).write_bytes(raw)
    found = manager.load_latest()
    assert found is not None and found[1] == manager.step_path(1) and _equal(found[0], STATE)


# ---------------------------------------------------------------------------------------------------
# Random state dicts through load_backbone
# ---------------------------------------------------------------------------------------------------

TINY = create_model("iresnet_tiny", num_features=8).state_dict()
TINY_BYTES = _bytes_of(TINY)


@st.composite
def _tensor(draw: Draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    dtype = draw(
        st.sampled_from(
            [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64]
        )
    )
    return torch.zeros(shape, dtype=dtype)


@st.composite
def _state_dicts(draw: Draw) -> Any:
    """The tiny model's state_dict with some entries changed, dropped or added, sometimes wrapped."""
    state: dict[Any, Any] = dict(TINY)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(TINY)))
        kind = draw(st.sampled_from(["tensor", "drop", "add", "value"]))
        if kind == "tensor":
            state[key] = draw(_tensor())
        elif kind == "drop":
            state.pop(key, None)
        elif kind == "add":
            state[draw(st.sampled_from(["layer5.0.x", "layer1.99.bn1.weight", "fc.extra", 7, ("a",)]))] = (
                draw(_tensor())
            )
        else:
            state[key] = draw(st.sampled_from([1, 1.5, "x", None, [torch.zeros(1)], {"a": torch.zeros(1)}]))
    if draw(st.booleans()):
        state = {f"module.{k}" if isinstance(k, str) else k: v for k, v in state.items()}
    wrap = draw(st.sampled_from(["plain", "facems", "insightface", "list", "empty"]))
    if wrap == "facems":
        config: Any = draw(
            st.sampled_from(
                [
                    {"model": {"name": "iresnet_tiny", "num_features": 8}},
                    {"model": {"name": "iresnet_tiny", "num_features": -3}},
                    {"model": {"name": 5, "num_features": 8}},
                    {"model": {"name": "no_such_net", "num_features": 8}},
                    {"model": {"name": "iresnet_tiny", "num_features": "8"}},
                    {"model": ["iresnet_tiny"]},
                    ["not", "a", "dict"],
                    "iresnet_tiny",
                    None,
                ]
            )
        )
        return {"format": 1, "model": state, "config": config}
    if wrap == "insightface":
        return {"state_dict_backbone": state, "epoch": 3}
    if wrap == "list":
        return [state]
    if wrap == "empty":
        return {}
    return state


@settings(FUZZ, max_examples=40)
@given(obj=_state_dicts())
def test_random_state_dicts_build_the_model_or_raise_weights_error(tmp_path: Path, obj: Any) -> None:
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    try:
        model = load_backbone(path)
    except WeightsError as e:
        event("refused")
        assert str(e).startswith(str(path)), str(e)
    else:
        event("loaded")
        loaded = model.state_dict()
        inner = obj["model"] if "format" in obj else obj.get("state_dict_backbone", obj)
        stripped = {k.removeprefix("module."): v for k, v in inner.items()}
        assert list(loaded) == list(TINY)
        for key, value in loaded.items():
            assert torch.equal(value, stripped[key].to(value.dtype)), key


def test_the_unchanged_state_dict_loads(tmp_path: Path) -> None:
    """The property above is not vacuous: the seed state dict itself loads with equal weights."""
    path = tmp_path / "model.pt"
    path.write_bytes(TINY_BYTES)
    model = load_backbone(path)
    assert all(torch.equal(v, TINY[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------
# Refuse to execute
# ---------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object calls a function that creates ``marker``."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind = kind
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        m = self.marker
        return {
            "path_touch": (pathlib.Path.touch, (pathlib.Path(m),)),
            "os_system": (os.system, (f"touch '{m}'",)),
            "exec": (builtins.exec, (f"open({m!r}, 'w').close()",)),
            "open": (builtins.open, (m, "w")),
            "subprocess": (subprocess.call, (["touch", m],)),
            "mkdir": (os.mkdir, (m,)),
        }[self.kind]


KINDS = ["path_touch", "os_system", "exec", "open", "subprocess", "mkdir"]
PLACES = ["top", "model_entry", "config", "optimizer_state", "nested_list", "dict_key_value"]


def test_every_payload_really_creates_its_file(tmp_path: Path) -> None:
    for kind in KINDS:
        marker = tmp_path / f"made_by_{kind}"
        result = pickle.loads(pickle.dumps(_Payload(kind, marker)))
        if hasattr(result, "close"):
            result.close()
        assert marker.exists(), kind


def _with_payload(payload: _Payload, place: str) -> Any:
    model = OrderedDict((k, v) for k, v in TINY.items() if k.startswith(("conv1.", "features.", "fc.")))
    state = {"format": 1, "model": model, "config": {"model": {"name": "iresnet_tiny", "num_features": 8}}}
    if place == "top":
        return payload
    if place == "model_entry":
        state["model"]["fc.weight"] = payload
    elif place == "config":
        state["config"]["model"]["name"] = payload
    elif place == "optimizer_state":
        state["optimizer"] = {"state": {0: {"momentum_buffer": payload}}, "param_groups": []}
    elif place == "nested_list":
        state["rng"] = [[[payload]]]
    else:
        state["extra"] = {"k": (1, payload)}
    return state


@settings(FUZZ, max_examples=60)
@given(
    kind=st.sampled_from(KINDS),
    place=st.sampled_from(PLACES),
    fmt=st.sampled_from(["zip", "legacy", "raw_pickle"]),
    entry=st.sampled_from(["load_checkpoint", "load_latest", "read_backbone_state", "load_backbone"]),
)
def test_reduce_payloads_are_refused_everywhere_and_create_nothing(
    tmp_path: Path, kind: str, place: str, fmt: str, entry: str
) -> None:
    marker = tmp_path / f"pwned_{kind}_{place}_{fmt}_{entry}"
    folder = tmp_path / f"ckpt_{kind}_{place}_{fmt}_{entry}"
    folder.mkdir()
    path = folder / "checkpoint_00000001.pt"
    obj = _with_payload(_Payload(kind, marker), place)
    if fmt == "raw_pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    if entry == "load_checkpoint":
        with pytest.raises(CheckpointError, match=r"weights_only|Unpickl|global") as info:
            load_checkpoint(path)
    elif entry == "load_latest":
        with pytest.raises(CheckpointError, match="could be loaded") as info:
            CheckpointManager(folder).load_latest()
    elif entry == "read_backbone_state":
        with pytest.raises(WeightsError, match="weights_only") as info:
            read_backbone_state(path)
    else:
        with pytest.raises(WeightsError, match="weights_only") as info:
            load_backbone(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    """A TorchScript archive holds code: torch.load(weights_only=True) must not dispatch to jit.load."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="TorchScript"):
        load_backbone(path)


def test_atomic_save_round_trip_is_what_the_fuzzers_compare_against(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    atomic_save(STATE, path)
    assert _equal(load_checkpoint(path), STATE)
    assert not _equal(load_checkpoint(path), {**STATE, "step": 8})
