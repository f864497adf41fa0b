"""Exponential moving average of all parameters and buffers."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """An EMA copy of a model, updated with fused ``foreach`` operations every step.

    Floating-point parameters and buffers (BN running statistics included) are averaged;
    integer buffers (``num_batches_tracked``) are copied. The pairs of tensors are collected
    once: build the EMA after the model has its final device and memory format.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self._live = model
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self._pairs = self._collect(model)

    def _collect(
        self, model: nn.Module
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        ema_state = self.module.state_dict(keep_vars=True)
        live_state = model.state_dict(keep_vars=True)
        float_ema, float_live, int_ema, int_live = [], [], [], []
        for key, ema_value in ema_state.items():
            live = live_state[key]
            if ema_value.dtype.is_floating_point:
                float_ema.append(ema_value.data)
                float_live.append(live.data)
            else:
                int_ema.append(ema_value.data)
                int_live.append(live.data)
        return float_ema, float_live, int_ema, int_live

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the live model: ema = decay * ema + (1 - decay) * live."""
        float_ema, float_live, int_ema, int_live = self._pairs
        torch._foreach_lerp_(float_ema, float_live, 1.0 - self.decay)
        for ema_value, live in zip(int_ema, int_live, strict=True):
            ema_value.copy_(live)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model`` with the averaged weights (the authors' loop does this)."""
        if model is not self._live:
            model.load_state_dict(self.module.state_dict())
            return
        float_ema, float_live, int_ema, int_live = self._pairs
        torch._foreach_copy_(float_live, float_ema)
        for ema_value, live in zip(int_ema, int_live, strict=True):
            live.copy_(ema_value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, in the model's own key names."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore averaged weights saved by :meth:`state_dict`."""
        self.module.load_state_dict(state)
