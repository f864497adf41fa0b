"""The data sets ``--dataset`` can name: the shipped ones, those of the modules named in
:data:`DATASET_MODULES`, and any that other code registers with :func:`register_dataset` (the
parsers read the registry when they are built)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TypeVar

from data.dataset import DataSet
from data.llcm import LLCM
from data.regdb import RegDB
from data.sysu import SYSU
from utils.base.errors import UserError

Registrable = TypeVar("Registrable", DataSet, type[DataSet])


class DataSetRegistry:
    """Data sets by ``--dataset`` name, in registration order; ``modules`` are imported at the
    first lookup, when the ``data`` package is complete, so they import from it freely."""

    def __init__(self, datasets: Sequence[DataSet] = (), modules: Sequence[str] = ()) -> None:
        self._by_name: dict[str, DataSet] = {}
        self._modules = list(modules)
        for dataset in datasets:
            self.register(dataset)

    def _import_modules(self) -> None:
        """Import the data-set modules not imported yet."""
        while self._modules:
            importlib.import_module(self._modules.pop(0))

    def register(self, dataset: DataSet) -> None:
        """Add ``dataset``; its name must be new (the same class again is a no-op)."""
        if not isinstance(dataset, DataSet):
            raise TypeError(f"{dataset!r} is not a DataSet (subclass data.DataSet)")
        dataset.check_declaration()
        known = self._by_name.get(dataset.name)
        if known is not None and type(known) is not type(dataset):
            raise ValueError(
                f"data set name {dataset.name!r} is already registered by "
                f"{type(known).__module__}.{type(known).__qualname__}"
            )
        self._by_name.setdefault(dataset.name, dataset)

    def unregister(self, name: str) -> None:
        """Remove the data set registered as ``name`` (nothing if there is none)."""
        self._by_name.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(dataset.name for dataset in self.datasets())

    def datasets(self) -> tuple[DataSet, ...]:
        """The registered data sets, in registration order."""
        self._import_modules()
        return tuple(self._by_name.values())

    def get(self, name: str) -> DataSet:
        """The data set registered as ``name`` (case and surrounding spaces ignored)."""
        self._import_modules()
        key = str(name).strip().lower()
        if key not in self._by_name:
            raise UserError(f"--dataset {name!r}: expected one of {', '.join(self._by_name)}")
        return self._by_name[key]


# Modules of this package that register data sets with ``@register_dataset``, in the order
# ``--help`` lists their data sets after the shipped ones, e.g. ``("data.nightvi",)``.
DATASET_MODULES: tuple[str, ...] = ()
# The one registry of the process: the shipped data sets first.
DATASETS = DataSetRegistry((SYSU(), RegDB(), LLCM()), DATASET_MODULES)


def register_dataset(dataset: Registrable) -> Registrable:
    """Register a data set (a DataSet subclass or instance) for ``--dataset``; returns it.

    Usable as a class decorator: ``@register_dataset`` above ``class NightVI(DataSet)``.
    """
    DATASETS.register(dataset() if isinstance(dataset, type) else dataset)
    return dataset


def unregister_dataset(name: str) -> None:
    """Remove a data set registered as ``name`` (for code that registers one temporarily)."""
    DATASETS.unregister(name)


def registered_datasets() -> tuple[DataSet, ...]:
    """Every registered data set, shipped ones first."""
    return DATASETS.datasets()


def dataset_names() -> tuple[str, ...]:
    """The ``--dataset`` names, in registration order."""
    return DATASETS.names()


def get_dataset(name: str) -> DataSet:
    """The data set registered as ``name`` (case and surrounding spaces ignored)."""
    return DATASETS.get(name)
