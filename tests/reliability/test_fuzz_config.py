"""Property tests: hostile and broken config YAML files and dotted overrides against facems.config.

Every input gives either a valid Config whose values are the ones the file or override sets (read back
independently with yaml.safe_load), or a ConfigError that names the file (or the override) and the
place: the YAML line, or the dotted key. Never another exception, never a hang, never executed YAML.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from _fuzz import Draw, fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from facems.config import ConfigError, config_to_dict, list_presets, load_config

pytestmark = pytest.mark.timeout(120)

FUZZ = fuzz_settings(120)

PRESET_DIR = Path(__file__).resolve().parents[2] / "facems" / "configs"
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
DEFAULTS = config_to_dict(load_config())
KEYS = [(s, k) for s, body in DEFAULTS.items() if isinstance(body, dict) for k in body]

# ---------------------------------------------------------------------------------------------------
# Oracle: a loaded config holds what the last layer that sets a key says
# ---------------------------------------------------------------------------------------------------


def _same(got: Any, want: Any) -> bool:
    """A config value equals a YAML value (ints read into float fields, lists into tuples)."""
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, str) and isinstance(got, float):  # "1e-3": PyYAML leaves it a string
        return math.isclose(float(want), got, rel_tol=0, abs_tol=0)
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return float(got) == float(want)
    return got == want


def _check_values(cfg_dict: dict[str, Any], layer: dict[str, Any]) -> None:
    for section, body in layer.items():
        if section in ("inherit", "name") or not isinstance(body, dict):
            continue
        for key, want in body.items():
            got = cfg_dict[section][key]
            if section == "train" and key == "output_dir" and "{name}" in str(want):
                want = str(want).replace("{name}", cfg_dict["name"])
            assert _same(got, want), f"{section}.{key}: config holds {got!r}, the file says {want!r}"


_PLACE = re.compile(
    r"line \d+|column \d+|\b[a-z_]+\.[a-z_0-9]+\b|top level|nested too deeply|not UTF-8|\bname\b"
)


def _load(path: Path, text_or_bytes: str | bytes, overrides: tuple[str, ...] = ()) -> Any:
    if isinstance(text_or_bytes, str):
        path.write_text(text_or_bytes, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(text_or_bytes)
    try:
        cfg = load_config(str(path), list(overrides))
    except ConfigError as e:
        event("refused")
        message = str(e)
        # An override is one line: naming it names the place; in a file, the line or the key does.
        names_override = any(repr(o)[:30] in message for o in overrides)
        assert str(path) in message or names_override, message
        assert names_override or _PLACE.search(message), message
        return None
    event("loaded")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------

_VALUES = [
    "-1",
    "0",
    "1",
    "2",
    "-0.5",
    "1e-3",
    "1.0e-3",
    "1e999",
    ".inf",
    "-.inf",
    ".nan",
    "99999999999999999999999999999",
    "-99999999999999999999999999999",
    "true",
    "false",
    "yes",
    "null",
    "~",
    "''",
    '"0.1"',
    "[]",
    "[1, 2]",
    "[0.9, 0.999]",
    "[a, b, a]",
    "{}",
    "{a: 1}",
    "sgd",
    "adamw",
    "ms",
    "arcface",
    "iresnet50",
    "2024-01-01",
    "!!binary aGVsbG8=",
    "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system",
    "&a [1, *a]",
    "*undefined",
    "[" * 50 + "]" * 50,
    "'" + "x" * 2000 + "'",
    "\ud800",  # a lone surrogate: not encodable as UTF-8
    "\x00",
    "\t1",
    "@",
    "`x`",
    "|\n  text",
]


def _mutate(draw: Draw, text: str) -> str | bytes:
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        kind = draw(
            st.sampled_from(["value", "value", "value", "key", "indent", "dup", "delete", "junk", "insert"])
        )
        line = lines[i] if lines else ""
        if kind == "value" and ":" in line:
            head = line.split(":", 1)[0]
            lines[i] = f"{head}: {draw(st.sampled_from(_VALUES) | st.text(max_size=6))}"
        elif kind == "key" and ":" in line:
            indent = line[: len(line) - len(line.lstrip())]
            lines[i] = (
                indent
                + draw(st.sampled_from(["unknown_key", "inherit", "name", "p", "lr", "1", "[a]"]))
                + ":"
                + line.split(":", 1)[1]
            )
        elif kind == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "    ", "\t"])) + line.lstrip()
        elif kind == "dup":
            lines.insert(i, line)
        elif kind == "delete" and lines:
            del lines[i]
        elif kind == "junk":
            lines.insert(i, draw(st.text(max_size=12)))
        elif kind == "insert":
            s, k = draw(st.sampled_from(KEYS))
            lines.insert(i, f"{s}:\n  {k}: {draw(st.sampled_from(_VALUES))}")
    out = "\n".join(lines)
    if draw(st.integers(0, 5)) == 0:
        raw = bytearray(out.encode("utf-8", "surrogatepass"))
        if raw:
            pos = draw(st.integers(0, len(raw) - 1))
            raw[pos] = draw(st.integers(0, 255))
        return bytes(raw)
    return out


def _expected_layer(data: str | bytes) -> dict[str, Any] | None:
    """The file's own mapping as an independent safe_load sees it, when it is one."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        parsed = yaml.safe_load(text)
    except Exception:
        return None
    return parsed if isinstance(parsed, dict) else None


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_mutated_presets(tmp_path: Path, data: st.DataObject) -> None:
    preset = data.draw(st.sampled_from(PRESETS))
    mutated = _mutate(data.draw, preset.read_text(encoding="utf-8"))
    cfg = _load(tmp_path / "mutated.yaml", mutated)
    if cfg is not None:
        layer = _expected_layer(mutated)
        assert layer is not None, "loaded a file that is not a YAML mapping"
        _check_values(config_to_dict(cfg), layer)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200))
def test_random_files(tmp_path: Path, data: bytes | str) -> None:
    cfg = _load(tmp_path / "random.yaml", data)
    if cfg is not None:
        layer = _expected_layer(data)
        assert layer is not None or not (data.strip() if isinstance(data, (str, bytes)) else data)
        _check_values(config_to_dict(cfg), layer or {})


@st.composite
def _overrides(draw: Draw) -> str:
    """``key=value`` strings: mostly real keys with their default or a hostile value, some broken."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.text(max_size=20))
    section, key = draw(st.sampled_from(KEYS))
    real = f"{section}.{key}"
    dotted = draw(st.sampled_from([real, real, real, f"{real}x", f"{section}..{key}", f"{real}.x", "name"]))
    valid = json.dumps(DEFAULTS[section][key])  # JSON is YAML: the default, spelled out
    value = draw(
        st.sampled_from(_VALUES) | st.text(max_size=8) | st.just(valid) | st.just(valid) | st.just(valid)
    )
    return f"{dotted}={value}"


@FUZZ
@given(overrides=st.lists(_overrides(), min_size=1, max_size=3))
def test_dotted_overrides(tmp_path: Path, overrides: list[str]) -> None:
    base = (PRESET_DIR / "synthetic_demo.yaml").read_text(encoding="utf-8")
    cfg = _load(tmp_path / "base.yaml", base, tuple(overrides))
    if cfg is None:
        return
    got = config_to_dict(cfg)
    final: dict[tuple[str, ...], Any] = {}
    for text in overrides:  # the last override of a key wins
        key, _, raw = text.partition("=")
        final[tuple(key.strip().split("."))] = yaml.safe_load(raw)
    for parts, want in final.items():
        if parts == ("name",):
            assert got["name"] == want
        else:
            _check_values(got, {parts[0]: {parts[1]: want}})


_HOSTILE = {
    # Anchors defined inside the value itself: a 300-byte file whose value has 9**8 leaves.
    "billion_laughs": "data:\n  root: [&a0 [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
    + "]\n",
    "laughs_in_a_literal": "loss:\n  margin_head: [&a0 [x, x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8))
    + "]\n",
    "laughs_in_a_section": "data: [&a0 [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
    + "]\n",
    "deep_list": "data:\n  val_targets: " + "[" * 20000 + "]" * 20000 + "\n",
    "deep_map": "data: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
    "python_object": "data:\n  root: !!python/object/apply:os.system ['touch {marker}']\n",
    "python_name": "model:\n  name: !!python/name:os.system\n",
    "python_module": "model:\n  name: !!python/module:os\n",
    "unhashable_key": "data:\n  ? [a, b]\n  : 1\n",
    "huge_int": "data:\n  p: " + "9" * 5000 + "\n",
    "huge_float_text": "optim:\n  lr: '" + "1" * 5000 + "e-9999'\n",
    "nul_byte": "data:\n  root: a\x00b\n",
    "two_documents": "data: {p: 2}\n---\ndata: {p: 3}\n",
    "recursive_alias": "data: &a {root: *a}\n",
    "long_key": "data:\n  " + "k" * 100000 + ": 1\n",
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_hostile_yaml_is_refused_quickly_and_runs_nothing(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"{name}.yaml"
    path.write_text(_HOSTILE[name].replace("{marker}", str(marker)), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert str(path) in message, message
    assert len(message) < 3000, f"a {len(message)}-character message"
    assert not marker.exists()


def test_the_oracle_sees_values(tmp_path: Path) -> None:
    """The oracle is not vacuous: it compares the loaded values with the file's."""
    path = tmp_path / "ok.yaml"
    path.write_text("inherit: synthetic_demo\ndata:\n  p: 3\noptim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n")
    cfg = config_to_dict(load_config(str(path)))
    _check_values(cfg, {"data": {"p": 3}, "optim": {"lr": "1e-3", "betas": [0.8, 0.9]}})
    with pytest.raises(AssertionError):
        _check_values(cfg, {"data": {"p": 4}})
    assert "synthetic_demo" in list_presets()
