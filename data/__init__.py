"""Data sets (SYSU-MM01, RegDB), the cross-modality sampler and the augmentation; no models."""

from data.images import load_images
from data.regdb import regdb_test
from data.sampler import CrossModalitySampler
from data.sysu import sysu_gallery, sysu_query
from data.trainset import TrainSet, load_train_set
from data.transforms import augment_batch, normalize

__all__ = [
    "CrossModalitySampler",
    "TrainSet",
    "augment_batch",
    "load_images",
    "load_train_set",
    "normalize",
    "regdb_test",
    "sysu_gallery",
    "sysu_query",
]
