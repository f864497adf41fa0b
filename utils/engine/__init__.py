"""The training engine: the loop (``trainer``), what a checkpoint holds and how a run resumes
(``state``), the run folder (``rundir``), stop signals (``signals``), batches on the device
(``batch``), the parts a run is built from (``build``), the EMA, the options and the search."""
