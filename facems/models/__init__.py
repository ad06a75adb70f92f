"""Backbones (face and retrieval) and the model registry.

Importing this package registers every backbone; build one with ``create_model(name, **kwargs)``.
Face backbones (``iresnet*``, ``mbf``) take 112x112 inputs in [-1, 1]; the retrieval networks
(``bninception``, ``resnet50``) are :class:`RetrievalNet` s whose ``preprocess`` method turns uint8 RGB
batches into the input their ImageNet weights expect.
"""

from facems.models import bninception, heads, iresnet, mobilefacenet, resnet
from facems.models.bninception import BNInception, caffe_preprocess
from facems.models.heads import EmbeddingHead, RetrievalNet, freeze_bn, load_pretrained
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
from facems.models.resnet import ResNet50Trunk, imagenet_preprocess, torchvision_resnet50_weights

__all__ = [
    "BNInception",
    "EmbeddingHead",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "ResNet50Trunk",
    "RetrievalNet",
    "WeightsError",
    "bninception",
    "caffe_preprocess",
    "create_model",
    "freeze_bn",
    "heads",
    "imagenet_preprocess",
    "infer_network",
    "iresnet",
    "list_models",
    "load_backbone",
    "load_pretrained",
    "mobilefacenet",
    "open_backbone",
    "read_backbone_state",
    "register_model",
    "resnet",
    "torchvision_resnet50_weights",
]
