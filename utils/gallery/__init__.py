"""A persistent gallery index: extract images once, add new ones as they come, search any day.

    python -m utils.gallery add --index gallery/ --images rgb_crops/ --modality visible \
        --weights runs/x/checkpoint_latest.pth --ema
    python -m utils.gallery search --index gallery/ --images ir_crops/ --modality infrared \
        --out matches/ [--topk 10] [--labels_from_folders] [--rerank] [--approximate]
    python -m utils.gallery info --index gallery/
    python -m utils.gallery remove --index gallery/ --images rgb_crops/cam4/ old.txt

``add`` extracts only the images the index does not hold yet, or holds with another size or
modification time, a batch at a time; every finished batch is committed, so a run killed at any
moment (even by SIGKILL) leaves a whole index that the next ``add`` continues. ``search`` writes
what ``python -m utils.match`` writes (its ``features.npz`` holds the queries only), with the same
rankings and distances, computed in blocks of queries (memory: the features plus a fixed block).

The folder (format version 1; docs/gallery.md describes it in full):

- ``index.json``: the header: ``format``, ``version``, ``modality``, ``dim``, ``settings`` (what
  the features depend on: the SHA-256 of the weights, live or EMA weights, feature, flip and the
  preprocessing; an index refuses features made otherwise) and ``checkpoint`` (where it was);
- ``shards/NNNNNNNN.json``: one shard's images in order: ``paths`` (as listed), ``resolved``
  (absolute, the key), ``sizes`` and ``mtimes_ns``, and ``features``, the name of its ``.npy``
  (float32, one row per image, L2-normalised);
- ``approximate.faiss`` and ``approximate.json``: the faiss index of ``--approximate``, if built;
- ``skipped.txt``: the images the last ``add`` could not read; ``.lock``: held by a writer.
"""
