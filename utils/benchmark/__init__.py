"""Speed benchmark: training paths, feature extraction, metrics, re-ranking, search (JSON).

    python -m utils.benchmark                       # paper sizes on CUDA, small sizes on a CPU
    python -m utils.benchmark --threads 1 --out bench.json --markdown bench.md

Sections of the JSON document (printed to stdout, written to ``--out``):

- ``fast``: the engine's own :meth:`Trainer.training_step` (uint8 images resident on the device,
  batched augmentation there, bf16, channels-last and fused Adam on CUDA, no host sync per step).
- ``plain``: the authors' style: fp32, NCHW, every image augmented alone on the CPU in DataLoader
  workers, the batch copied to the device, for-loop Adam and EMA, the loss read back every step.
- ``speedup``: fast images/s over plain images/s.
- ``features``: :func:`extract_features` images/s.
- ``metrics``: ``eval_sysu`` (best of 3) against its per-query loop at the SYSU multi-shot size.
- ``rerank``: ``rerank`` (on the run's torch threads) against ``rerank_reference`` (one core).
- ``llcm``: ``eval_llcm`` and ``rerank`` at the size of LLCM's infrared-to-visible test.
- ``search``: a search step against a training step.
- ``gallery``: a gallery index of synthetic features: add, exact and approximate search
  (``utils.benchmark.gallery``).

Images/s count both modalities, ``2 * batch_size * steps / seconds``, for the fastest of
``--rounds`` windows after ``--warmup`` untimed steps (the best window filters out other programs'
bursts on a shared machine). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's maximum resident set size on the CPU. No unit test asserts a speed.

Each section is a :class:`~utils.benchmark.section.Section` in its own module; adding one is a
module with a ``run(bench) -> dict`` function and its entry in ``registry.SECTIONS``.
"""

from utils.benchmark.options import BenchSettings, get_args_parser, read_options, resolve_options
from utils.benchmark.report import markdown_table
from utils.benchmark.run import main, run_benchmark
from utils.benchmark.training import plain_loader

__all__ = [
    "BenchSettings",
    "get_args_parser",
    "main",
    "markdown_table",
    "plain_loader",
    "read_options",
    "resolve_options",
    "run_benchmark",
]
