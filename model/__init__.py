"""Networks of the codebase: modality BN slots, ResNet backbones, architectures, checkpoints.

``build_model(load_arch(path), num_classes)`` builds a network, ``load_checkpoint`` fills it and
``model_from_checkpoint`` rebuilds the one a checkpoint describes (examples: docs/api.md).
"""

from model.arch import DEPTHS, SHARED, SPLIT, Arch, load_arch, save_arch, slot_names
from model.bn import ModalityBN, Routing, find_slots
from model.checkpoint import read_checkpoint
from model.net import CMNASNet, build_model
from model.restore import Restored, model_from_checkpoint
from model.weights import LoadReport, load_checkpoint, load_imagenet

__all__ = [
    "DEPTHS",
    "SHARED",
    "SPLIT",
    "Arch",
    "CMNASNet",
    "LoadReport",
    "ModalityBN",
    "Restored",
    "Routing",
    "build_model",
    "find_slots",
    "load_arch",
    "load_checkpoint",
    "load_imagenet",
    "model_from_checkpoint",
    "read_checkpoint",
    "save_arch",
    "slot_names",
]
