"""Shared utilities: metrics, the training engine, checkpoints, logging and options."""
