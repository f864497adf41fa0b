"""The training engine: the loop, its run state and checkpoints, the run folder and the search."""
