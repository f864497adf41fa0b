"""Networks of the codebase: modality BN slots, ResNet backbones, architectures, checkpoints.

Public API::

    from model import load_arch, build_model, load_checkpoint
    arch = load_arch("configs/two_stream.json")      # or an authors' config.cfg
    model = build_model(arch, num_classes=395, last_stride=1, pretrained="imagenet")
    load_checkpoint(model, "runs/sysu/checkpoint_latest.pth", ema=True)
    pool, feat = model.eval()(images, "infrared")

    from model import model_from_checkpoint         # the network a checkpoint describes
    model = model_from_checkpoint("runs/sysu/checkpoint_latest.pth", ema=True).model
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
