"""What the retrieval backbones share: the embedding head, frozen BatchNorm, the wrapper, weight loading.

The image-retrieval setup of the MS-loss paper (and of its official code, ``msight-tech/research-ms-loss``)
is an ImageNet trunk pooled to one vector per image (BN-Inception: 1024-d, global max pooling;
ResNet-50: 2048-d, global average pooling), then a linear layer to the embedding (512-d) whose output is
L2-normalised. :class:`RetrievalNet` is that composition; its ``state_dict`` keys are ``backbone.*`` and
``head.fc.*``, the names of the official code's ``Sequential(backbone, head)``.

The official code keeps every BatchNorm layer in eval mode while training (``model.train()`` followed
by ``model.apply(set_bn_eval)`` at every iteration; its notes report about +2% Recall@1 on CUB and no
effect elsewhere). :func:`freeze_bn` does the same once, and ``RetrievalNet(freeze_bn=True)`` re-applies
it whenever the network is put in train mode, so a training loop that only calls ``model.train()``
gets the official behaviour. The BatchNorm affine parameters stay trainable; only the running
statistics are frozen (the layers normalise with them instead of the batch statistics).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facems.models.loading import WeightsError

__all__ = [
    "BATCH_NORM_LAYERS",
    "EmbeddingHead",
    "Preprocess",
    "RetrievalNet",
    "freeze_bn",
    "load_pretrained",
    "prepare_uint8_batch",
]

BATCH_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)

#: uint8 RGB ``(N, 3, H, W)`` images, optional bool ``(N,)`` flip mask, channels_last -> model input.
Preprocess = Callable[[Tensor, "Tensor | None", bool], Tensor]


def freeze_bn(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``model`` in eval mode (running statistics used and not updated).

    This is the official MS-loss code's ``model.apply(set_bn_eval)``. It lasts until the next
    ``model.train()``, which puts the layers back in train mode; :class:`RetrievalNet` built with
    ``freeze_bn=True`` calls this again from its ``train()``. Affine parameters keep ``requires_grad``.

    Args:
        model: any module; its BatchNorm1d/2d/3d and SyncBatchNorm layers are affected.

    Returns:
        ``model`` itself.
    """
    for m in model.modules():
        if isinstance(m, BATCH_NORM_LAYERS):
            m.eval()
    return model


class EmbeddingHead(nn.Module):
    """Linear projection to the embedding, L2-normalised, computed in fp32.

    Initialisation follows the official code's ``LinearNorm`` head (``weights_init_kaiming``):
    ``kaiming_normal_(weight, a=0, mode="fan_out")`` (std ``sqrt(2 / embedding_size)``) and a zero bias.

    Args:
        in_features: size of the pooled backbone feature (1024 for BN-Inception, 2048 for ResNet-50).
        embedding_size: output dimension (512 in the paper).
        dropout: dropout probability on the pooled feature before the linear layer (0: none, as the
            official code).
        normalize: L2-normalise the output (the official head does); ``False`` returns the raw projection.
    """

    def __init__(
        self, in_features: int, embedding_size: int = 512, dropout: float = 0.0, normalize: bool = True
    ) -> None:
        super().__init__()
        if in_features < 1 or embedding_size < 1:
            raise ValueError(
                f"EmbeddingHead: in_features={in_features}, embedding_size={embedding_size}: expected integers >= 1"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"EmbeddingHead: dropout={dropout}: expected a probability in [0, 1)")
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_features, embedding_size)
        self.normalize = normalize
        nn.init.kaiming_normal_(self.fc.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_features)`` -> ``(N, embedding_size)`` fp32 (unit L2 norm when ``normalize``)."""
        x = self.dropout(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.fc(x.float())
            if self.normalize:
                x = F.normalize(x, p=2.0, dim=1)
        return x


class RetrievalNet(nn.Module):
    """An ImageNet trunk pooled to a vector, then :class:`EmbeddingHead`.

    Args:
        backbone: module mapping the preprocessed ``(N, 3, H, W)`` input to ``(N, out_features)``; it must
            have an integer ``out_features`` attribute.
        embedding_size: embedding dimension (exposed as ``num_features``, as the face backbones do).
        preprocess: the input transform the backbone's weights expect (see :meth:`preprocess`).
        input_size: the training crop side the recipe uses for this backbone (227 for BN-Inception, 224
            for ResNet-50); informative, the network accepts other sizes.
        dropout: dropout before the embedding layer.
        normalize: L2-normalise the embedding.
        freeze_bn: keep every BatchNorm layer in eval mode, also after ``train()`` (official default).
    """

    def __init__(
        self,
        backbone: nn.Module,
        embedding_size: int,
        preprocess: Preprocess,
        input_size: int,
        dropout: float = 0.0,
        normalize: bool = True,
        freeze_bn: bool = True,
    ) -> None:
        super().__init__()
        out_features = getattr(backbone, "out_features", None)
        if not isinstance(out_features, int):
            raise ValueError(
                f"RetrievalNet: backbone {type(backbone).__name__} has out_features={out_features!r}: "
                "expected an integer attribute"
            )
        self.backbone = backbone
        self.head = EmbeddingHead(out_features, embedding_size, dropout=dropout, normalize=normalize)
        self.num_features = embedding_size
        self.input_size = input_size
        self.frozen_bn = freeze_bn
        self._preprocess = preprocess
        self.train()

    def train(self, mode: bool = True) -> RetrievalNet:
        """Set train/eval mode; with ``freeze_bn`` the BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode and self.frozen_bn:
            freeze_bn(self)
        return self

    def preprocess(self, images: Tensor, flip: Tensor | None = None, channels_last: bool = False) -> Tensor:
        """uint8 RGB ``(N, 3, H, W)`` -> the float input this backbone's weights expect, on ``images``' device.

        Same signature as :func:`facems.data.transforms.normalize_faces`, so a loop can call
        ``model.preprocess`` where it calls ``normalize_faces`` for face backbones.
        """
        return self._preprocess(images, flip, channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` preprocessed images -> ``(N, num_features)`` fp32 embeddings."""
        return self.head(self.backbone(x))


def prepare_uint8_batch(images: Tensor, flip: Tensor | None, caller: str) -> Tensor:
    """Check a uint8 ``(N, 3, H, W)`` batch and mirror the rows selected by ``flip`` (on the uint8 data).

    Raises:
        ValueError: ``images`` is not uint8 ``(N, 3, H, W)`` or ``flip`` has not one entry per image.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{caller}: images of dtype {images.dtype} and shape {tuple(images.shape)}: "
            "expected a uint8 (N, 3, H, W) RGB tensor"
        )
    if flip is None:
        return images
    if flip.shape != images.shape[:1]:
        raise ValueError(
            f"{caller}: flip of shape {tuple(flip.shape)}: expected ({images.shape[0]},), one per image"
        )
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def _describe(keys: Collection[str], limit: int = 8) -> str:
    names = sorted(keys)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    ignore: Collection[str] = (),
    what: str = "weights",
) -> None:
    """Load a local ``state_dict`` file into ``model``, strictly; nothing is ever downloaded.

    The file is read with ``torch.load(weights_only=True)`` (nothing in it is executed). Every key of
    ``model.state_dict()`` must be in the file with the same shape, and the file may hold no other key,
    with three exceptions:

    * keys in ``ignore`` (e.g. the ImageNet classifier, ``last_linear.*`` or ``fc.*``) are dropped from
      the file when present;
    * BatchNorm ``num_batches_tracked`` counters may be absent (files older than PyTorch 0.4.1); the
      model's own values are kept;
    * a ``(1, C)`` tensor loads into a ``(C,)`` one (Caffe ports of BN-Inception store the BatchNorm
      vectors that way).

    Args:
        model: the module to fill (in place).
        path: the weights file; ``~`` is expanded.
        ignore: file keys to drop.
        what: what the file is, for error messages (e.g. ``"BN-Inception ImageNet weights"``).

    Raises:
        WeightsError: the file is missing or unreadable, is not a ``str -> tensor`` mapping, or its keys
            or shapes differ from the model's; the message names the file and the keys.
    """
    where = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(where):
        raise WeightsError(
            f"{where}: no such file ({what}); facems never downloads weights: put the file there"
        )
    try:
        obj: Any = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors come in several types
        raise WeightsError(
            f"{where}: cannot be read as {what} with torch.load(weights_only=True): {e}"
        ) from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise WeightsError(
            f"{where}: holds a {type(obj).__name__}: expected a state_dict (str -> tensor) of {what}"
        )
    ignored = set(ignore)
    state = {k: v for k, v in obj.items() if k not in ignored}
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = set(own) - set(state) - optional
    unexpected = set(state) - set(own)
    wrong: list[str] = []
    for key, value in list(state.items()):
        if key not in own:
            continue
        want = own[key].shape
        if value.shape != want and value.dim() == 2 and value.shape[0] == 1 and value.shape[1:] == want:
            value = state[key] = value[0]
        if value.shape != want:
            wrong.append(f"{key}: file {list(value.shape)}, model {list(want)}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_describe(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:8])}")
        raise WeightsError(f"{where}: does not match {type(model).__name__} ({what}): " + "; ".join(parts))
    for key in optional - set(state):
        state[key] = own[key]
    model.load_state_dict(state, strict=True)
