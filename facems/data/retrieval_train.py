"""Training on the retrieval benchmarks (CUB-200-2011, Cars196, SOP, In-Shop) with the face loop's pieces.

:class:`RetrievalTrainDataset` serves the training split that :mod:`facems.protocols.retrieval` reads,
augmented as the MS-loss paper's official code does (``research-ms-loss``,
``ret_benchmark/data/transforms/build.py``): ``Resize(256)`` (shorter side), ``RandomResizedCrop(227,
scale=(0.16, 1))`` with torchvision's default aspect-ratio range (3/4, 4/3), ``RandomHorizontalFlip(0.5)``.
It returns uint8 RGB ``(3, crop, crop)`` tensors; the model's own input transform (``preprocess`` of the
retrieval networks: Caffe BGR for BN-Inception, ImageNet mean/std for ResNet-50; ``(x/255 - 0.5)/0.5``
for the face backbones) runs on the device, as in the face path. Batches come from the same
:class:`facems.data.samplers.DistributedPKSampler` (P classes x K images) through a plain ``DataLoader``
(:func:`build_retrieval_loader`).

Why torchvision.transforms.v2 on uint8 tensors for the augmentation, and OpenCV for decoding. Measured
on the 2-core CPU machine while other jobs loaded it (one thread, a 500x375 JPEG, best of 3 x 200
images, two runs): the resize to 341x256 takes 4.9 / 3.3 ms with OpenCV's ``INTER_AREA`` (the filter
:func:`facems.protocols.retrieval.resize_center_crop` uses) and 1.1 / 1.1 ms with v2's antialiased
bilinear resize of a uint8 tensor; the whole train transform with decoding took 13.6 / 7.0 ms all in
OpenCV and 5.3 / 5.6 ms all in torchvision. v2 is also torchvision's own RandomResizedCrop, so crop
boxes are drawn exactly as in the official code (and pixels land within one grey level of its PIL
pipeline; tested). Decoding costs about the same either way (OpenCV 4.1 / 2.3 ms, ``decode_jpeg``
4.6 / 2.1 ms); OpenCV ``imread`` is kept because it reads every JPEG variant the four data sets hold
(greyscale and CMYK included) and the evaluation images go through it too. The chosen combination
took 6.7 to 8.8 ms per image in the same conditions.

Random draws (crop box, flip) use the torch generator of the process that runs the dataset: the
DataLoader seeds each worker from a base seed drawn from the training RNG, so a run is reproducible,
but a resumed run draws other crops than an uninterrupted one would (the face path's flip, drawn on
the device from the step number, is exact across resumes).

:func:`evaluate_retrieval_sharded` is the evaluation during training: every rank embeds a contiguous
share of the test images (``facems.protocols.retrieval.embed_split``), the shares are gathered in order,
and :func:`facems.protocols.retrieval.evaluate_embeddings` computes the data set's Recall@K and MAP@R.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from facems.protocols.retrieval import (
    RetrievalDataset,
    RetrievalResult,
    RetrievalSplit,
    embed_split,
    evaluate_embeddings,
)

__all__ = [
    "DEFAULT_RATIO",
    "PreprocessedModel",
    "RetrievalTrainDataset",
    "build_retrieval_loader",
    "evaluate_retrieval_sharded",
    "model_input",
]

# torchvision's RandomResizedCrop default, which the official code keeps.
DEFAULT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
_FACE_MEAN_STD = (0.5, 0.5, 0.5)


class RetrievalTrainDataset(Dataset):
    """The training images of a retrieval split, augmented: ``(uint8 RGB (3, crop, crop), label)``.

    Each item is decoded with OpenCV, then ``Resize(resize)`` (shorter side, antialiased),
    ``RandomResizedCrop(crop, scale, ratio)`` and, with ``flip``, ``RandomHorizontalFlip(0.5)``
    (torchvision.transforms.v2 on the uint8 tensor). See the module docstring for the choices.

    Args:
        split: the training split (``RetrievalDataset.train``).
        resize: length of the shorter side before the random crop (256 in the official code).
        crop: side of the square output (227 for BN-Inception, 224 for ResNet-50).
        scale: range of the crop's area as a fraction of the resized image, ``0 < lo <= hi <= 1``.
        ratio: range of the crop's aspect ratio (width / height), ``0 < lo <= hi``.
        flip: mirror each image horizontally with probability 0.5.

    Raises:
        ValueError: an empty split or an argument out of range (named with its value).
        OSError (on access): an image that is missing or does not decode, named by its path.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        resize: int = 256,
        crop: int = 227,
        scale: tuple[float, float] = (0.16, 1.0),
        ratio: tuple[float, float] = DEFAULT_RATIO,
        flip: bool = True,
    ) -> None:
        if len(split) == 0:
            raise ValueError("split: no training images")
        if crop < 1 or resize < 1:
            raise ValueError(f"resize, crop: expected integers >= 1, got resize {resize} and crop {crop}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale: expected 0 < lo <= hi <= 1 (fractions of the area), got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio: expected 0 < lo <= hi (width / height), got {ratio}")
        self.paths = list(split.paths)
        self._labels = np.asarray(split.labels, dtype=np.int64)
        self.resize, self.crop = int(resize), int(crop)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = bool(flip)
        from torchvision.transforms import v2  # imported here: torchvision (and torch._dynamo) take ~2.5 s

        steps: list[nn.Module] = [
            v2.Resize(self.resize, antialias=True),
            v2.RandomResizedCrop(self.crop, scale=self.scale, ratio=self.ratio, antialias=True),
        ]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        self.transform = v2.Compose(steps)

    @property
    def labels(self) -> np.ndarray:
        """int64 class label of every image (read-only view), for the P x K sampler."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(np.unique(self._labels).shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(crop, crop)``: the size of every image returned."""
        return (self.crop, self.crop)

    def __len__(self) -> int:
        return len(self.paths)

    def read_rgb(self, index: int) -> Tensor:
        """Image ``index`` decoded, un-augmented: uint8 RGB ``(3, H, W)``."""
        path = self.paths[index]
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)  # greyscale and CMYK JPEGs come back as 3 channels
        if bgr is None:
            raise OSError(f"{path}: missing or not a decodable image")
        return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        out = self.transform(self.read_rgb(index))
        return out.contiguous(), int(self._labels[index])


def build_retrieval_loader(
    dataset: RetrievalTrainDataset,
    sampler: Sampler[int],
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = True,
    batch_size: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` of ``(uint8 images (N, 3, crop, crop), int64 labels (N,))`` for the training loop.

    Args:
        dataset: the augmented training images.
        sampler: yields dataset indices, e.g. ``DistributedPKSampler`` (call its ``set_epoch`` before
            each epoch); each batch of ``sampler.batch_size`` indices is one step.
        num_workers: decoding and augmenting processes (0: in the calling process).
        pin_memory: page-locked batches for faster copies to a CUDA device.
        prefetch_factor: batches each worker prepares ahead.
        persistent_workers: keep the workers between epochs.
        batch_size: images per batch; default ``sampler.batch_size`` (P * K).

    Raises:
        ValueError: a count out of range, or no batch size.
    """
    if batch_size is None:
        batch_size = getattr(sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                f"build_retrieval_loader: {type(sampler).__name__} has no batch_size; pass batch_size="
            )
    if batch_size < 1 or num_workers < 0 or prefetch_factor < 1:
        raise ValueError(
            f"build_retrieval_loader: batch_size {batch_size} (>= 1), num_workers {num_workers} (>= 0), "
            f"prefetch_factor {prefetch_factor} (>= 1)"
        )
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
    )


class PreprocessedModel(nn.Module):
    """Feeds ``model`` its own input transform from the ``(x / 255 - 0.5) / 0.5`` batches of ``embed_images``.

    The evaluators (``facems.embed``, ``facems.protocols``) normalise uint8 images as the face
    backbones expect. A network with a ``preprocess(images, flip, channels_last)`` method (the retrieval
    networks) wants another input; this module recovers the exact uint8 pixels (the round trip through
    ``(x / 255 - 0.5) / 0.5`` is off by far less than half a grey level) and applies that method, so the
    evaluated model sees what it saw in training, to the bit.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(model, "preprocess", None)):
            raise ValueError(f"PreprocessedModel: {type(model).__name__} has no preprocess() method")
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        channels_last = (
            x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        )
        pixels = (x.float() * 127.5 + 127.5).round_().clamp_(0, 255).to(torch.uint8)
        preprocess: Any = self.model.preprocess
        return self.model(preprocess(pixels, None, channels_last))


def model_input(model: nn.Module) -> nn.Module:
    """``model`` as the evaluators call it: wrapped in :class:`PreprocessedModel` when it has ``preprocess``."""
    return PreprocessedModel(model) if callable(getattr(model, "preprocess", None)) else model


def _gather_rows(local: np.ndarray) -> np.ndarray:
    """Every rank's rows, concatenated in rank order (the local rows without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return np.concatenate([p for p in parts if p.shape[0] > 0])  # a rank with no share sent (0, 0)


def _embed_share(
    model: nn.Module, split: RetrievalSplit, rank: int, world: int, opts: dict[str, Any]
) -> np.ndarray:
    n = len(split)
    lo, hi = rank * n // world, (rank + 1) * n // world
    if hi == lo:
        return np.zeros((0, 0), dtype=np.float32)
    share = RetrievalSplit(split.paths[lo:hi], split.labels[lo:hi])
    return embed_split(model, share, **opts)


def evaluate_retrieval_sharded(
    model: nn.Module,
    dataset: RetrievalDataset,
    *,
    resize: int,
    crop: int,
    ks: Sequence[int] | None = None,
    batch_size: int = 64,
    flip: bool = False,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    num_workers: int = 2,
) -> RetrievalResult:
    """The data set's Recall@K and MAP@R on its test split, embedded by every rank of the process group.

    Images: shorter side ``resize``, centre crop ``crop`` (``facems.protocols.retrieval.resize_center_crop``),
    then the model's own input transform (:func:`model_input`). Rank ``r`` of ``W`` embeds images
    ``[r * N // W, (r + 1) * N // W)`` of the query split (and of the gallery for In-Shop); the rows are
    gathered in order, so the result equals the one-process evaluation. **Every rank must call this**
    when a process group of more than one rank is initialised; every rank returns the result.

    Args:
        model: the backbone (un-wrapped from DDP), on ``device``.
        dataset: the data set as its reader returned it.
        resize, crop: the test-time geometry (256 and 227 for BN-Inception, 224 for ResNet-50).
        ks: K of Recall@K; default the data set's customary ones.
        batch_size: images per forward pass, per rank.
        flip: add the embedding of the mirrored image (off in the metric-learning protocol).
        device, precision, num_workers: as ``facems.protocols.retrieval.embed_split``.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    opts: dict[str, Any] = {
        "batch_size": batch_size,
        "resize": resize,
        "crop": crop,
        "mean": _FACE_MEAN_STD,  # embed_images' own (x / 255 - 0.5) / 0.5; model_input takes it from there
        "std": _FACE_MEAN_STD,
        "flip": flip,
        "device": device,
        "precision": precision,
        "num_workers": num_workers,
    }
    net = model_input(model)
    query = _gather_rows(_embed_share(net, dataset.query, rank, world, opts))
    gallery = None
    if dataset.gallery is not None:
        gallery = _gather_rows(_embed_share(net, dataset.gallery, rank, world, opts))
    if world == 1:
        return evaluate_embeddings(dataset, query, gallery, ks)
    # The neighbour search runs on the CPU: once, on rank 0, not on every rank at the same time.
    box: list[Any] = [evaluate_embeddings(dataset, query, gallery, ks) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    result: RetrievalResult = box[0]
    return result
