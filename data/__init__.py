"""Data sets (SYSU-MM01, RegDB, LLCM) behind one interface, the cross-modality sampler and the
augmentation; no models."""

from data.dataset import (
    DataSet,
    ExclusionRule,
    ImageList,
    ListedImage,
    Protocol,
    ProtocolSettings,
    TrainFiles,
)
from data.images import load_images
from data.llcm import llcm_gallery, llcm_query
from data.regdb import regdb_test
from data.registry import dataset_names, get_dataset
from data.sampler import CrossModalitySampler
from data.sysu import sysu_gallery, sysu_query
from data.trainset import TrainSet, load_train_set
from data.transforms import augment_batch, normalize

__all__ = [
    "CrossModalitySampler",
    "DataSet",
    "ExclusionRule",
    "ImageList",
    "ListedImage",
    "Protocol",
    "ProtocolSettings",
    "TrainFiles",
    "TrainSet",
    "augment_batch",
    "dataset_names",
    "get_dataset",
    "llcm_gallery",
    "llcm_query",
    "load_images",
    "load_train_set",
    "normalize",
    "regdb_test",
    "sysu_gallery",
    "sysu_query",
]
