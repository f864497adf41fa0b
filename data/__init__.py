"""Data sets (SYSU-MM01, RegDB, LLCM, and any registered with ``register_dataset``) behind one
interface, the building blocks of a data-set module, the cross-modality sampler and the
augmentation; no models."""

from data.blocks import IMAGE_SUFFIXES, CameraFolders, IndexList, image_files, read_ids, read_index
from data.dataset import (
    DataSet,
    ExclusionRule,
    ImageList,
    Protocol,
    ProtocolSettings,
    TrainFiles,
)
from data.images import ListedImage, load_images
from data.llcm import llcm_gallery, llcm_query
from data.regdb import regdb_test
from data.registry import (
    dataset_names,
    get_dataset,
    register_dataset,
    registered_datasets,
    unregister_dataset,
)
from data.sampler import CrossModalitySampler
from data.sysu import sysu_gallery, sysu_query
from data.trainset import TrainSet, load_train_set
from data.transforms import augment_batch, normalize

__all__ = [
    "IMAGE_SUFFIXES",
    "CameraFolders",
    "CrossModalitySampler",
    "DataSet",
    "ExclusionRule",
    "ImageList",
    "IndexList",
    "ListedImage",
    "Protocol",
    "ProtocolSettings",
    "TrainFiles",
    "TrainSet",
    "augment_batch",
    "dataset_names",
    "get_dataset",
    "image_files",
    "llcm_gallery",
    "llcm_query",
    "load_images",
    "load_train_set",
    "normalize",
    "read_ids",
    "read_index",
    "regdb_test",
    "register_dataset",
    "registered_datasets",
    "sysu_gallery",
    "sysu_query",
    "unregister_dataset",
]
