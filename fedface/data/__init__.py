"""Data loading for fedface: images, LFW protocol files, data set folders, face alignment."""

from .align import AlignConfig, FaceAligner
from .datasets import FaceDataset, load_dataset, scan_identity_folder
from .images import ImageError, load_image
from .pairs import Pair, PairFileError, read_pairs, read_people
from .report import DataReport

__all__ = [
    "AlignConfig",
    "DataReport",
    "FaceAligner",
    "FaceDataset",
    "ImageError",
    "Pair",
    "PairFileError",
    "load_dataset",
    "load_image",
    "read_pairs",
    "read_people",
    "scan_identity_folder",
]
