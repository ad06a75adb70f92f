"""Tests for the backbone registry."""

from __future__ import annotations

import pytest
from torch import nn

from facems.models import IResNet, MobileFaceNet, create_model, list_models, register_model, registry

EXPECTED_NAMES = ["iresnet100", "iresnet18", "iresnet200", "iresnet34", "iresnet50", "iresnet_tiny", "mbf"]


def test_list_models_contains_all_names_sorted() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(EXPECTED_NAMES) <= set(names)


def test_create_model_builds_registered_classes() -> None:
    assert isinstance(create_model("iresnet_tiny"), IResNet)
    assert isinstance(create_model("mbf", num_features=128), MobileFaceNet)


def test_create_model_forwards_kwargs() -> None:
    model = create_model("iresnet_tiny", num_features=64, dropout=0.3)
    assert isinstance(model, IResNet)
    assert model.fc.out_features == 64
    assert model.dropout.p == pytest.approx(0.3)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        create_model("resnet9000")
    message = str(excinfo.value)
    assert "resnet9000" in message
    for name in list_models():
        assert name in message


def test_duplicate_registration_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # Work on a copy of the registry so this test leaves no trace.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def iresnet18() -> nn.Module:  # same name as an existing entry point
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(iresnet18)

    def _facems_test_model(**kwargs: int) -> nn.Module:
        return nn.Linear(kwargs.get("n", 1), 1)

    assert register_model(_facems_test_model) is _facems_test_model
    assert "_facems_test_model" in list_models()
    model = create_model("_facems_test_model", n=3)
    assert isinstance(model, nn.Linear) and model.in_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model(_facems_test_model)


def test_registry_left_clean() -> None:
    assert "_facems_test_model" not in list_models()
