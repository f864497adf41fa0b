"""The benchmark's sections in the order they run (``--skip`` takes their names)."""

from utils.benchmark.extractor import EXTRACTOR
from utils.benchmark.gallery import GALLERY
from utils.benchmark.precision import PRECISION
from utils.benchmark.ranking import LLCM_SECTION, METRICS, RERANK
from utils.benchmark.training import FAST, FEATURES, PLAIN, SEARCH

# The sections on the fast path's Trainer run first, so it is freed before the plain path's
# memory is measured.
SECTIONS = (
    FAST,
    FEATURES,
    PLAIN,
    METRICS,
    RERANK,
    LLCM_SECTION,
    SEARCH,
    EXTRACTOR,
    GALLERY,
    PRECISION,
)
