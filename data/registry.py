"""The data sets ``--dataset`` can name: one instance per data set module, in ``REGISTERED``."""

from __future__ import annotations

from types import MappingProxyType

from data.dataset import DataSet
from data.llcm import LLCM
from data.regdb import RegDB
from data.sysu import SYSU
from utils.base.errors import UserError

# A new data set is one module under data/ and one entry here.
REGISTERED: tuple[DataSet, ...] = (SYSU(), RegDB(), LLCM())
_BY_NAME = MappingProxyType({dataset.name: dataset for dataset in REGISTERED})


def dataset_names() -> tuple[str, ...]:
    """The ``--dataset`` names, in registration order."""
    return tuple(_BY_NAME)


def get_dataset(name: str) -> DataSet:
    """The data set registered as ``name`` (case and surrounding spaces ignored)."""
    key = str(name).strip().lower()
    if key not in _BY_NAME:
        raise UserError(f"--dataset {name!r}: expected one of {', '.join(_BY_NAME)}")
    return _BY_NAME[key]
