"""Evaluation: metrics, re-ranking, the protocol runner and the pictures of results."""
