"""Dataset readers (MNIST IDX, CIFAR-10 / CIFAR-100 batches, image folders) into in-memory uint8 datasets,
stratified subsets, batched augmentation and the in-memory batch loader."""
from shared.data.augment import NORMALIZATION, PRESETS, AugmentConfig, BatchAugment
from shared.data.memory import InMemoryDataset, InMemoryLoader, resolve_source

from shared.data.cifar import (  # noqa: E402  isort: skip
    CIFAR10_CLASSES,
    read_cifar10,
    read_cifar100,
    read_cifar_batch,
)
from shared.data.imagefolder import (  # noqa: E402  isort: skip
    image_folder_splits,
    read_image_folder,
    read_image_folder_splits,
)
from shared.data.mnist import MNIST_CLASSES, parse_idx, read_idx, read_mnist, write_idx  # noqa: E402  isort: skip
from shared.data.subsets import stratified_split, stratified_subset  # noqa: E402  isort: skip
from shared.data.synthetic import synthetic_digits  # noqa: E402  isort: skip

__all__ = [
    "AugmentConfig", "BatchAugment", "CIFAR10_CLASSES", "InMemoryDataset", "InMemoryLoader", "MNIST_CLASSES",
    "NORMALIZATION", "PRESETS", "image_folder_splits", "parse_idx", "read_cifar10", "read_cifar100",
    "read_cifar_batch", "read_idx", "read_image_folder", "read_image_folder_splits", "read_mnist",
    "resolve_source", "stratified_split", "stratified_subset", "synthetic_digits", "write_idx",
]
