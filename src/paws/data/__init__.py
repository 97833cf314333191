"""A run's images: where they come from, how they are read, and the batches made of them.

- :mod:`paws.data.images`: finding, reading and decoding image files; :class:`ImageSet`.
- :mod:`paws.data.builtin`: the file formats of Fashion-MNIST and CIFAR.
- :mod:`paws.data.sources`: a config's unlabelled, labelled and test sets (:func:`load_datasets`).
- :mod:`paws.data.checks`: what in them looks unintended (a test set of the labelled images...).
- :mod:`paws.data.loaders`: augmented views for each training step, and evaluation views.
- :mod:`paws.data.transforms`: the multi-crop augmentation, batched on tensors and per image.
"""

from paws.data.builtin import load_cifar, load_fashion_mnist
from paws.data.images import ImageSet, read_image, scan_images, scan_labeled_folder
from paws.data.loaders import Batch, Loading, eval_batches, step_batches
from paws.data.sources import Datasets, load_datasets, select_labeled

__all__ = [
    "Batch",
    "Datasets",
    "ImageSet",
    "Loading",
    "eval_batches",
    "load_cifar",
    "load_datasets",
    "load_fashion_mnist",
    "read_image",
    "scan_images",
    "scan_labeled_folder",
    "select_labeled",
    "step_batches",
]
