"""The two imaging modalities of visible-infrared re-identification."""

from __future__ import annotations

import enum


class Modality(enum.IntEnum):
    """Modality of an image; the integer value is what per-sample tensors hold."""

    VISIBLE = 0
    INFRARED = 1

    @classmethod
    def parse(cls, value: str | int | Modality) -> Modality:
        """Return the modality named by ``value`` ("visible"/"infrared", an int or a member)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            if key in ("visible", "rgb"):
                return cls.VISIBLE
            if key in ("infrared", "ir", "thermal"):
                return cls.INFRARED
            raise ValueError(f"unknown modality {value!r}: expected 'visible' or 'infrared'")
        return cls(int(value))
