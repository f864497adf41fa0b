"""Speed benchmark: training paths, feature extraction, metrics, re-ranking, search (JSON).

    python -m utils.benchmark                       # paper sizes on CUDA, small sizes on a CPU
    python -m utils.benchmark --threads 1 --out bench.json --markdown bench.md

Images/s count both modalities, ``2 * batch_size * steps / seconds``, for the fastest of
``--rounds`` windows after ``--warmup`` untimed steps (the best window filters out other programs'
bursts on a shared machine). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's maximum resident set size on the CPU. No unit test asserts a speed.

Each section of the JSON document is a :class:`~utils.benchmark.section.Section` (its name, a
``run(bench) -> dict`` function, its Markdown rows) listed in ``registry.SECTIONS``.
"""

from utils.benchmark.options import BenchSettings, get_args_parser, read_options, resolve_options
from utils.benchmark.run import main, markdown_table, run_benchmark
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
