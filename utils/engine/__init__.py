"""The training engine: the loop (``trainer``), run state and resume rules (``state``), the run
folder and its checkpoints (``checkpointer``), stop signals, batches on the device (``batch``),
the parts a run is built from (``build``), the EMA, the options and the search."""
