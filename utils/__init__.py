"""Utilities in layers; a layer imports only the layers above it in this list.

- ``utils.base``: errors, modality names, atomic files, devices, logging, the CLI wrapper and
  process groups; imports nothing else of the project (``data`` and ``model`` build on it).
- ``utils.evaluation``: metrics, re-ranking, the evaluation routine and the pictures of results.
- ``utils.engine``: the training loop, its run state and checkpoints, the run folder, the options
  and the search.
- The modules directly in ``utils`` are command-line tools (``python -m utils.NAME``); they may
  use every layer. ``utils.metrics`` is kept as the public import path of the metrics.
"""
