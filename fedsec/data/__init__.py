"""Datasets, partitions and the image preparation shared by every node."""

from fedsec.data.datasets import DATASETS, ImageDataset, load_dataset
from fedsec.data.partition import PARTITIONERS, client_indices, k_shot_indices
from fedsec.data.transforms import prepare_images

__all__ = [
    "DATASETS",
    "ImageDataset",
    "load_dataset",
    "PARTITIONERS",
    "client_indices",
    "k_shot_indices",
    "prepare_images",
]
