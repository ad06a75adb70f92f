"""Face-recognition backbones and the model registry.

Importing this package registers every backbone; build one with ``create_model(name, **kwargs)``.
"""

from facems.models import iresnet, mobilefacenet
from facems.models.iresnet import IBasicBlock, IResNet
from facems.models.mobilefacenet import MobileFaceNet
from facems.models.registry import create_model, list_models, register_model

__all__ = [
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "create_model",
    "iresnet",
    "list_models",
    "mobilefacenet",
    "register_model",
]
