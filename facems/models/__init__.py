"""Face-recognition backbones and the model registry.

Importing this package registers every backbone; build one with ``create_model(name, **kwargs)``.
"""

from facems.models import iresnet, mobilefacenet
from facems.models.iresnet import IBasicBlock, IResNet
from facems.models.loading import (
    WeightsError,
    infer_network,
    load_backbone,
    open_backbone,
    read_backbone_state,
)
from facems.models.mobilefacenet import MobileFaceNet
from facems.models.registry import create_model, list_models, register_model

__all__ = [
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "WeightsError",
    "create_model",
    "infer_network",
    "iresnet",
    "list_models",
    "load_backbone",
    "mobilefacenet",
    "open_backbone",
    "read_backbone_state",
    "register_model",
]
