"""Data sets for NAT training: ImageNet-style class folders, subsets, timm readers, and an embedded
synthetic shapes set and a long-range Pathfinder-like set, generated locally (no download).
See `build_datasets` for the config keys."""

from . import compat
from .builder import DatasetBundle, build_datasets, write_selection
from .errors import DataError
from .folder import (
    FolderImageDataset,
    build_image_folder,
    corrupt_count,
    list_images,
    read_class_list,
    resolve_classes,
)
from .pathfinder import generate_pathfinder_dataset
from .synthetic import SHAPE_NAMES, generate_synthetic_dataset

compat.install()  # before any transform is built: timm looks its ops up when it makes them

__all__ = [
    "SHAPE_NAMES",
    "DataError",
    "DatasetBundle",
    "FolderImageDataset",
    "build_datasets",
    "build_image_folder",
    "corrupt_count",
    "generate_pathfinder_dataset",
    "generate_synthetic_dataset",
    "list_images",
    "read_class_list",
    "resolve_classes",
    "write_selection",
]
