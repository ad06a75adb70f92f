"""The retrieval keys of facems.config (data.kind, data.dataset, transforms, model and eval options) and presets."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import pytest

from facems.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    save_config,
)

DATASETS = ("cub", "cars", "sop", "inshop")
RETRIEVAL_PRESETS = [f"{d}_{net}" for d in DATASETS for net in ("bninception", "resnet50")]
# Training images of each benchmark's training split (facems.protocols.retrieval.OFFICIAL_COUNTS).
TRAIN_IMAGES = {"cub": 5864, "cars": 8054, "sop": 59551, "inshop": 25882}

RETRIEVAL = ["data.kind=retrieval", "data.dataset=cub", "data.root=/data/CUB_200_2011", "data.image_size=227"]


def test_defaults_keep_the_face_behaviour() -> None:
    cfg = Config(name="x")
    assert cfg.data.kind == "face" and cfg.data.dataset is None and cfg.data.flip
    assert cfg.data.resize == 256 and cfg.data.crop_scale == (0.16, 1.0)
    assert cfg.model.pretrained is None and cfg.model.freeze_bn is None
    assert not cfg.eval.keep_best_on_test
    assert load_config().data.kind == "face"


def test_retrieval_overrides_are_typed_and_checked() -> None:
    cfg = load_config(
        None, [*RETRIEVAL, "data.crop_scale=[1, 1]", "model.freeze_bn=false", "data.flip=false"]
    )
    assert (cfg.data.kind, cfg.data.dataset, cfg.data.image_size) == ("retrieval", "cub", 227)
    assert cfg.data.crop_scale == (1.0, 1.0) and isinstance(cfg.data.crop_scale[0], float)
    assert cfg.model.freeze_bn is False and not cfg.data.flip
    cfg = load_config(None, [*RETRIEVAL, "model.pretrained=torchvision", "eval.keep_best_on_test=true"])
    assert cfg.model.pretrained == "torchvision" and cfg.eval.keep_best_on_test


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.kind=retrieval"], r"data\.dataset = None: expected one of 'cub', 'cars', 'sop', 'inshop'"),
        (["data.dataset=cub"], r"data\.dataset = 'cub': expected null with data\.kind='face'"),
        ([*RETRIEVAL, "data.dataset=cubs"], r"data\.dataset = 'cubs': expected null or one of 'cub'"),
        (["data.kind=retrievel"], r"data\.kind = 'retrievel'.*did you mean 'retrieval'"),
        (["data.crop_scale=[0.5, 0.2]"], r"data\.crop_scale = \[0\.5, 0\.2\]: expected two area fractions"),
        (["data.crop_scale=[0, 1]"], r"data\.crop_scale = \[0\.0, 1\.0\]: expected two area fractions"),
        (["data.crop_scale=[0.5, 1.5]"], r"data\.crop_scale = \[0\.5, 1\.5\]"),
        (["data.crop_scale=[0.5]"], r"data\.crop_scale = \[0\.5\]: expected a list of 2 numbers"),
        ([*RETRIEVAL, "data.resize=200"], r"data\.resize = 200: expected an integer >= data\.image_size=227"),
        (["data.resize=0"], r"data\.resize = 0: expected an integer >= 1"),
        (
            ["eval.keep_best_on_test=true"],
            r"eval\.keep_best_on_test = True: expected false with data\.kind='face'",
        ),
        (["model.freeze_bn=yes please"], r"model\.freeze_bn = 'yes please': expected null or true or false"),
        (['model.pretrained=""'], r"model\.pretrained = '': expected null, a file path or 'torchvision'"),
    ],
)
def test_bad_retrieval_values_are_errors_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_face_resize_below_the_crop_is_not_checked() -> None:
    """data.resize is a retrieval setting; a face run never reads it."""
    assert load_config(None, ["data.resize=64"]).data.resize == 64


def test_retrieval_config_saves_and_loads_back(tmp_path: Path) -> None:
    cfg = load_config("sop_bninception", ["data.root=/somewhere", "model.freeze_bn=false"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)) == cfg


def test_an_older_config_dict_without_the_new_keys_is_a_face_run() -> None:
    d = config_to_dict(load_config())
    for key in ("kind", "dataset", "resize", "crop_scale", "flip"):
        del d["data"][key]
    del d["model"]["pretrained"], d["model"]["freeze_bn"], d["eval"]["keep_best_on_test"]
    assert config_from_dict(d) == load_config()


def test_every_retrieval_preset_is_shipped() -> None:
    assert set(RETRIEVAL_PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", RETRIEVAL_PRESETS)
def test_retrieval_preset_has_the_official_settings(name: str) -> None:
    text = (resources.files("facems") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith(f"# {name}:") and "research-ms-loss" in text  # says where numbers come from
    cfg = load_config(name)
    dataset, net = name.split("_")
    assert cfg.name == name and config_from_dict(config_to_dict(cfg)) == cfg
    dc = cfg.data
    assert (dc.kind, dc.dataset, dc.resize, dc.crop_scale, dc.flip) == (
        "retrieval",
        dataset,
        256,
        (0.16, 1.0),
        True,
    )
    assert dc.root.startswith("/data/") and dc.val_targets == [] and dc.k == 5
    assert dc.p * dc.k == (1000 if dataset in ("sop", "inshop") else 80)
    assert (cfg.model.name, cfg.model.num_features, cfg.model.freeze_bn) == (net, 512, True)
    assert dc.image_size == (227 if net == "bninception" else 224)
    assert cfg.model.pretrained is not None  # ImageNet weights, from a local file only
    assert cfg.loss == dataclasses.replace(
        Config(name="x").loss, name="ms", alpha=2.0, beta=40.0, base=0.5, epsilon=0.1
    )
    oc = cfg.optim
    assert (oc.name, oc.lr, oc.weight_decay, oc.betas) == ("adam", 3e-5, 5e-4, (0.9, 0.999))
    assert not oc.no_decay_on_norm_bias_prelu
    sc = cfg.schedule
    assert (sc.name, sc.warmup_epochs, sc.milestones, sc.gamma) == ("step", 0.0, [0.4, 0.8], 0.1)
    assert not cfg.eval.flip and cfg.eval.at_start and not cfg.eval.keep_best_on_test
    assert cfg.eval.every_steps > 0
    steps_per_epoch = TRAIN_IMAGES[dataset] // (dc.p * dc.k)
    total = cfg.schedule.epochs * steps_per_epoch
    assert cfg.train.max_steps is None
    if dataset == "cub":  # about the official 3,000 iterations, x0.1 at about 1,200 and 2,400
        assert abs(total - 3000) < steps_per_epoch
        assert [round(m * total) for m in sc.milestones] == [1197, 2394]
    else:
        assert total >= 1000


@pytest.mark.parametrize("dataset", DATASETS)
def test_resnet50_preset_differs_from_bninception_only_in_the_network(dataset: str) -> None:
    bn = load_config(f"{dataset}_bninception")
    rn = load_config(f"{dataset}_resnet50")
    assert rn.model == dataclasses.replace(bn.model, name="resnet50", pretrained="torchvision")
    assert rn.data == dataclasses.replace(bn.data, image_size=224)
    for section in ("loss", "optim", "schedule", "train", "eval", "log"):
        if section == "train":
            assert dataclasses.replace(rn.train, output_dir="x") == dataclasses.replace(
                bn.train, output_dir="x"
            )
        else:
            assert getattr(rn, section) == getattr(bn, section), section
