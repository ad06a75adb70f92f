"""Tests of facems.config: resolution layers, strict types, ranges, presets, files and dicts."""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path

import pytest
import yaml

from facems.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    save_config,
)

PRESET_FILES = sorted(
    p.name for p in (resources.files("facems") / "configs").iterdir() if p.name.endswith(".yaml")
)
EXPECTED_PRESETS = {
    "synthetic_demo",
    "ms1mv2_r50",
    "ms1mv3_r50",
    "ms1mv3_r100",
    "glint360k_r100",
    "webface42m_r100",
    *(f"{d}_{m}" for d in ("cub", "cars", "sop", "inshop") for m in ("bninception", "resnet50")),
}


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- defaults and presets -------------------------------------------------------------------


def test_default_is_synthetic_demo_and_matches_the_brief() -> None:
    cfg = load_config()
    assert cfg == load_config("synthetic_demo")
    assert cfg.name == "synthetic_demo"
    assert cfg.model.name == "iresnet_nano_s2"
    assert (cfg.data.p, cfg.data.k) == (8, 8)
    assert cfg.train.precision == "auto"
    assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 0.003)
    assert cfg.eval.at_start and cfg.schedule.epochs == 7
    assert cfg.data.root == "data/synthetic"
    assert cfg.train.output_dir == "work_dirs/synthetic_demo"
    # MS loss at the official defaults, not pytorch-metric-learning's beta 50
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.base, cfg.loss.epsilon) == (2.0, 40.0, 0.5, 0.1)


def test_dataclass_defaults_are_the_brief_defaults() -> None:
    cfg = Config(name="x")
    assert cfg.model.init_from is None and cfg.model.channels_last and not cfg.model.compile
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 5e-4
    assert cfg.loss.margin_head is None and cfg.loss.xbm_size == 0
    assert cfg.train.keep_checkpoints == 2 and cfg.train.max_bad_steps == 20
    assert cfg.log.every_steps == 10 and cfg.schedule.power == 2.0
    assert cfg.train.output_dir == "work_dirs/x"


def test_shipped_presets_are_the_expected_ones() -> None:
    assert set(list_presets()) == EXPECTED_PRESETS
    assert {f[: -len(".yaml")] for f in PRESET_FILES} == EXPECTED_PRESETS


@pytest.mark.parametrize("filename", PRESET_FILES)
def test_each_shipped_preset_loads_and_round_trips(filename: str, tmp_path: Path) -> None:
    name = filename[: -len(".yaml")]
    text = (resources.files("facems") / "configs" / filename).read_text(encoding="utf-8")
    assert text.startswith("#"), "each preset documents itself in a header comment"
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.train.output_dir == f"work_dirs/{name}"
    assert config_from_dict(config_to_dict(cfg)) == cfg
    if cfg.data.kind == "retrieval":  # tests/test_config_retrieval.py checks these recipes
        assert name.startswith(f"{cfg.data.dataset}_") and cfg.model.name in name
    elif name != "synthetic_demo":
        assert cfg.model.name in ("iresnet50", "iresnet100")
        assert cfg.model.num_features == 512 and cfg.train.precision == "bf16"
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
            "sgd",
            0.1,
            0.9,
            5e-4,
        )
        assert cfg.schedule.name == "poly" and (cfg.data.p, cfg.data.k) == (32, 4)
        assert cfg.loss == dataclasses.replace(Config(name="x").loss, name="ms")
        assert cfg.data.root.startswith("/data/")


def test_inherited_preset_takes_parent_values_but_not_its_name() -> None:
    r50, r100 = load_config("ms1mv3_r50"), load_config("ms1mv3_r100")
    assert r100.name == "ms1mv3_r100" and r100.model.name == "iresnet100"
    assert r100.train.output_dir == "work_dirs/ms1mv3_r100"
    assert dataclasses.replace(r100, name="ms1mv3_r50", model=r50.model, train=r50.train) == r50
    assert dataclasses.replace(r100.train, output_dir=r50.train.output_dir) == r50.train


def test_unknown_preset_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'ms1mv2_r5'.*did you mean 'ms1mv2_r50'") as e:
        load_config("ms1mv2_r5")
    assert "synthetic_demo" in str(e.value)


# --- overrides --------------------------------------------------------------------------------


def test_overrides_of_each_type() -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=0.05",  # float
            "loss.beta=50",  # int accepted for float
            "optim.weight_decay=1e-4",  # YAML 1.1 reads this as a string; accepted for a float
            "loss.mining=false",  # bool
            "data.p=8",  # int
            "data.val_targets=[lfw, cfp_fp]",  # list[str]
            "loss.margin_head=arcface",  # Optional[Literal]
            "loss.chunk_size=64",  # Optional[int]
            "optim.grad_clip=5",  # Optional[float] from int
            "optim.betas=[0.8, 0.99]",  # tuple[float, float]
            "train.precision=fp16",  # Literal
            "model.init_from=/tmp/backbone.pth",  # Optional[str]
            "train.max_steps=10",
            "name=my_run",
        ],
    )
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.beta == 50.0 and isinstance(cfg.loss.beta, float)
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.loss.mining is False
    assert cfg.data.p == 8
    assert cfg.data.val_targets == ["lfw", "cfp_fp"]
    assert cfg.loss.margin_head == "arcface"
    assert cfg.loss.chunk_size == 64
    assert cfg.optim.grad_clip == 5.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.train.precision == "fp16"
    assert cfg.model.init_from == "/tmp/backbone.pth"
    assert cfg.train.max_steps == 10
    assert cfg.name == "my_run" and cfg.train.output_dir == "work_dirs/my_run"
    # untouched fields keep the preset's values
    assert cfg.data.k == 8 and cfg.model.name == "iresnet_nano_s2"


def test_null_override_and_later_override_wins() -> None:
    cfg = load_config(
        None, ["loss.margin_head=cosface", "loss.margin_head=null", "optim.lr=0.2", "optim.lr=0.3"]
    )
    assert cfg.loss.margin_head is None
    assert cfg.optim.lr == 0.3
    assert load_config(None, ["loss.chunk_size=~"]).loss.chunk_size is None


def test_explicit_output_dir_is_kept() -> None:
    cfg = load_config("ms1mv2_r50", ["train.output_dir=/scratch/run1", "name=other"])
    assert cfg.train.output_dir == "/scratch/run1"


@pytest.mark.parametrize("bad", ["optim.lr", "optim.lr:0.1", "optim=0.1", "optim.lr.x=1", "=3", ".lr=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [bad])


# --- unknown keys and wrong types -------------------------------------------------------------


def test_unknown_key_lists_valid_keys_and_suggests_closest() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert "'optim.lrr'" in msg
    assert "did you mean 'optim.lr'" in msg
    for key in (f.name for f in dataclasses.fields(OptimConfig)):
        assert key in msg
    assert "override 'optim.lrr=0.1'" in msg


def test_unknown_section_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optm'.*did you mean 'optim'") as e:
        load_config(None, ["optm.lr=0.1"])
    for section in ("data", "model", "loss", "optim", "schedule", "train", "eval", "log"):
        assert section in str(e.value)


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "data:\n  batch_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "'data.batch_size'" in str(e.value) and path in str(e.value)
    assert "num_workers" in str(e.value)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("optim.lr=fast", "optim.lr", "a number"),  # str for float
        ("optim.lr=true", "optim.lr", "a number"),  # bool for float
        ("loss.mining=1", "loss.mining", "true or false"),  # int for bool
        ("loss.mining='false'", "loss.mining", "true or false"),  # string for bool
        ("data.p=true", "data.p", "an integer"),  # bool for int
        ("data.p=2.5", "data.p", "an integer"),  # float for int
        ("data.p=16x", "data.p", "an integer"),
        ("loss.name=msx", "loss.name", "one of 'ms'"),  # bad Literal
        ("loss.margin_head=sphereface", "loss.margin_head", "null or one of 'arcface', 'cosface'"),
        ("train.precision=16", "train.precision", "one of"),
        ("data.val_targets=calfw", "data.val_targets", "a list of strings"),
        ("data.val_targets=[calfw, 3]", "data.val_targets[1]", "a string"),
        ("optim.betas=[0.9]", "optim.betas", "a list of 2 numbers"),
        ("data.root=123", "data.root", "a string"),
        ("loss.chunk_size=1.5", "loss.chunk_size", "null or an integer"),
        ("optim.lr=.nan", "optim.lr", "finite"),
    ],
)
def test_wrong_types_name_the_dotted_key(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(f"{key} = "), msg
    assert expected in msg, msg


def test_bad_literal_suggests_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        load_config(None, ["schedule.name=cosin"])


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.p=0", "data.p"),
        ("data.k=1", "data.k"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.grad_accum=0", "optim.grad_accum"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.dropout=-0.1", "model.dropout"),
        ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
        ("data.val_targets=[calfw, calfw]", "data.val_targets"),
        ("optim.momentum=1.0", "optim.momentum"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("schedule.epochs=0", "schedule.epochs"),
        ("schedule.warmup_epochs=7", "schedule.warmup_epochs"),  # = epochs of the default preset
        ("schedule.min_lr=1.0", "schedule.min_lr"),
        ("loss.chunk_size=0", "loss.chunk_size"),
        ("loss.xbm_size=-1", "loss.xbm_size"),
        ("loss.beta=0", "loss.beta"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.max_steps=0", "train.max_steps"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("log.every_steps=0", "log.every_steps"),
        ("name=../evil", "name"),
    ],
)
def test_range_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key} = "), str(e.value)


def test_boundary_values_are_accepted() -> None:
    cfg = load_config(
        None, ["data.k=2", "data.p=1", "model.dropout=0.0", "schedule.warmup_epochs=0", "optim.grad_accum=1"]
    )
    assert (cfg.data.k, cfg.data.p, cfg.optim.grad_accum) == (2, 1, 1)


def test_k_error_explains_the_positive_pair() -> None:
    with pytest.raises(ConfigError, match=r"data.k = 1: expected an integer >= 2 for loss.name='ms'"):
        load_config(None, ["data.k=1"])


def test_nesterov_needs_momentum() -> None:
    with pytest.raises(ConfigError, match=r"^optim\.nesterov = True"):
        load_config(None, ["optim.name=sgd", "optim.momentum=0", "optim.nesterov=true"])
    assert load_config(None, ["optim.name=sgd", "optim.nesterov=true"]).optim.nesterov


def test_ranges_hold_for_direct_construction_and_replace() -> None:
    with pytest.raises(ConfigError, match=r"^optim\.lr = -1\.0"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"^data\.p = 0"):
        dataclasses.replace(DataConfig(), p=0)


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = OptimConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


# --- files, dicts, safety -------------------------------------------------------------------


def test_yaml_path_works_like_a_preset(tmp_path: Path) -> None:
    path = write(tmp_path / "my_exp.yaml", "optim:\n  lr: 0.02\nloss:\n  beta: 50\n")
    cfg = load_config(path, ["data.p=4"])
    assert cfg.name == "my_exp"
    assert cfg.train.output_dir == "work_dirs/my_exp"
    assert (cfg.optim.lr, cfg.loss.beta, cfg.data.p) == (0.02, 50.0, 4)
    # a file layered on the defaults, not on synthetic_demo: the dataclass default epochs
    assert cfg.schedule.epochs == Config(name="x").schedule.epochs


def test_yaml_file_may_inherit_a_preset_and_set_its_name(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "inherit: ms1mv2_r50\nname: emore_b50\nloss:\n  beta: 50\n")
    cfg = load_config(path)
    base = load_config("ms1mv2_r50")
    assert cfg.name == "emore_b50" and cfg.loss.beta == 50.0
    assert cfg.model == base.model and cfg.data == base.data and cfg.optim == base.optim


def test_inherit_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "name: base\noptim:\n  lr: 0.03\ndata:\n  p: 3\n")
    child = write(tmp_path / "sub" / "child.yaml", "inherit: ../base.yaml\ndata:\n  p: 5\n")
    cfg = load_config(child)
    assert (cfg.name, cfg.optim.lr, cfg.data.p) == ("child", 0.03, 5)


def test_inherit_cycle_is_detected(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(a)
    assert "a.yaml" in str(e.value) and "b.yaml" in str(e.value)
    me = write(tmp_path / "self.yaml", "inherit: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(me)


def test_missing_file_and_bad_top_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not plain YAML"):
        load_config(write(tmp_path / "broken.yaml", "optim: [1, 2\n"))
    with pytest.raises(ConfigError, match="inherit"):
        load_config(write(tmp_path / "badinh.yaml", "inherit: 3\n"))
    with pytest.raises(ConfigError, match=r"^data = 3 in file .*expected a mapping"):
        load_config(write(tmp_path / "flat.yaml", "data: 3\n"))


def test_python_object_tag_is_refused_and_executes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    path = write(tmp_path / "evil.yaml", f"data:\n  root: {payload}\n")
    with pytest.raises(ConfigError, match="not plain YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not plain YAML"):
        load_config(None, [f"data.root={payload}"])
    with pytest.raises(ConfigError, match="not plain YAML"):
        load_config(write(tmp_path / "evil2.yaml", f"{payload}\n"))
    assert not marker.exists()
    # the payload is live: an unsafe loader would have run it, so the check above can fail
    yaml.unsafe_load(payload)
    assert marker.exists()


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    cfg = load_config(
        "ms1mv2_r50",
        [
            "optim.lr=0.0123456789012345",
            "optim.weight_decay=1e-5",
            "loss.margin_head=cosface",
            "optim.betas=[0.85, 0.995]",
            "optim.grad_clip=5",
            "data.val_targets=[]",
            "model.init_from=/w/backbone.pth",
            "name=round_trip",
        ],
    )
    path = str(tmp_path / "run" / "config.yaml")
    save_config(cfg, path)
    assert os.listdir(tmp_path / "run") == ["config.yaml"], "no temporary file left behind"
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    # the file is plain YAML that needs no facems to read
    assert yaml.safe_load(Path(path).read_text()) == config_to_dict(cfg)
    # overwriting in place works too
    save_config(dataclasses.replace(cfg, name="second"), path)
    assert load_config(path).name == "second"


def test_dict_round_trip_is_plain_and_exact() -> None:
    cfg = load_config(None, ["optim.betas=[0.8, 0.9]", "loss.chunk_size=32"])
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d, "only JSON types"
    assert d["optim"]["betas"] == [0.8, 0.9]
    assert set(d) == {"name", "data", "model", "loss", "optim", "schedule", "train", "eval", "log"}
    assert config_from_dict(d) == cfg
    assert config_from_dict(json.loads(json.dumps(d))) == cfg


def test_dict_is_loadable_by_torch_weights_only(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cfg = load_config()
    path = tmp_path / "ckpt.pt"
    torch.save({"config": config_to_dict(cfg)}, path)
    assert config_from_dict(torch.load(path, weights_only=True)["config"]) == cfg


def test_config_from_dict_validates() -> None:
    d = config_to_dict(load_config())
    d["optim"]["lr"] = "abc"
    with pytest.raises(ConfigError, match=r"optim.lr = 'abc'.*config dict"):
        config_from_dict(d)
    d = config_to_dict(load_config())
    d["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        config_from_dict(d)
    d = config_to_dict(load_config())
    d["extra"] = {}
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        config_from_dict(d)
    d = config_to_dict(load_config())
    del d["name"]
    with pytest.raises(ConfigError, match="name"):
        config_from_dict(d)


def test_config_from_partial_dict_fills_defaults() -> None:
    cfg = config_from_dict({"name": "old", "optim": {"lr": 0.5}})
    assert cfg == dataclasses.replace(Config(name="old"), optim=OptimConfig(lr=0.5))
