"""Checkpoint I/O, one module per concern.

* :mod:`model.checkpoint.safe`: reading any PyTorch file safely (``weights_only``, the file's
  kind sniffed first, every failure one line);
* :mod:`model.checkpoint.ours`: this project's format (header, atomic writing, reading, the
  checksums and the other checks of what a checkpoint holds);
* :mod:`model.checkpoint.authors`: the authors' checkpoints (``module.`` prefix, three BNs per
  slot) renamed to this project's keys;
* :mod:`model.checkpoint.imagenet`: ImageNet weights (downloaded into torch's cache or a local
  file) mapped onto the slots;
* :mod:`model.checkpoint.assign` and :mod:`model.checkpoint.load`: copying weights into a model,
  every key and shape checked.

Every name is importable from ``model.checkpoint`` itself.
"""

from model.checkpoint.assign import LoadReport, assign, summarize_keys
from model.checkpoint.authors import (
    AUTHOR_BRANCHES,
    convert_authors_state,
    is_authors_checkpoint,
)
from model.checkpoint.imagenet import IMAGENET_URLS, load_imagenet
from model.checkpoint.load import checkpoint_state, load_checkpoint, load_state
from model.checkpoint.ours import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CHECKSUM_KEY,
    SEARCH_KEY,
    checkpoint_header,
    damaged_tensors,
    is_resumable,
    is_search_checkpoint,
    plain,
    read_checkpoint,
    stored_integer,
    tensor_checksums,
    write_checkpoint,
)
from model.checkpoint.safe import first_line, safe_load
from model.checkpoint.tensors import largest_tensors, named_tensors, non_finite_tensors

__all__ = [
    "AUTHOR_BRANCHES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CHECKSUM_KEY",
    "IMAGENET_URLS",
    "SEARCH_KEY",
    "LoadReport",
    "assign",
    "checkpoint_header",
    "checkpoint_state",
    "convert_authors_state",
    "damaged_tensors",
    "first_line",
    "is_authors_checkpoint",
    "is_resumable",
    "is_search_checkpoint",
    "largest_tensors",
    "load_checkpoint",
    "load_imagenet",
    "load_state",
    "named_tensors",
    "non_finite_tensors",
    "plain",
    "read_checkpoint",
    "safe_load",
    "stored_integer",
    "summarize_keys",
    "tensor_checksums",
    "write_checkpoint",
]
