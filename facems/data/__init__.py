"""Data: RecordIO packs, face datasets, the training loader, the distributed P x K sampler, alignment,
.bin pair files."""

from facems.data.align import ARCFACE_TEMPLATE, estimate_norm, landmarks68_to_5, norm_crop
from facems.data.binfile import BinFileError, load_bin, save_bin
from facems.data.datasets import (
    DatasetError,
    ImageFolderFaceDataset,
    RecordFaceDataset,
    collate_faces,
    decode_image,
)
from facems.data.loader import FaceLoader, build_face_loader
from facems.data.recordio import (
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    RecordIOError,
    iter_records,
    pack,
    unpack,
)
from facems.data.samplers import DistributedPKSampler

__all__ = [
    "ARCFACE_TEMPLATE",
    "BinFileError",
    "DatasetError",
    "DistributedPKSampler",
    "FaceLoader",
    "IRHeader",
    "ImageFolderFaceDataset",
    "IndexedRecordReader",
    "IndexedRecordWriter",
    "RecordFaceDataset",
    "RecordIOError",
    "build_face_loader",
    "collate_faces",
    "decode_image",
    "estimate_norm",
    "iter_records",
    "landmarks68_to_5",
    "load_bin",
    "norm_crop",
    "pack",
    "save_bin",
    "unpack",
]
