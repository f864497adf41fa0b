"""The re-ranking flags (``--k1``, ``--k2``, ``--lambda_value``): their defaults, and a refusal
of values that cannot take effect (without ``--rerank``, or ``--k2`` above ``--k1``)."""

from __future__ import annotations

import argparse
from types import MappingProxyType

from utils.base.errors import UserError

# The re-ranking parameters of Zhong et al. (CVPR 2017), used when --rerank is given alone.
RERANK_DEFAULTS = MappingProxyType({"k1": 20, "k2": 6, "lambda_value": 0.3})
# Each flag's type and meaning (its --help).
RERANK_HELP = MappingProxyType(
    {
        "k1": (int, "k of the k-reciprocal neighbour sets"),
        "k2": (int, "neighbours of the local query expansion, at most --k1"),
        "lambda_value": (float, "weight of the original distance against the Jaccard distance"),
    }
)


def check_rerank_flags(args: argparse.Namespace) -> None:
    """Check ``--k1``, ``--k2``, ``--lambda_value`` and fill in the defaults of those not given.

    They take effect only with ``--rerank``: given without it, they are refused.
    """
    given = [flag for flag in RERANK_DEFAULTS if getattr(args, flag) is not None]
    for flag, default in RERANK_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    for flag in ("k1", "k2"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: expected an integer >= 1")
    if not 0 <= args.lambda_value <= 1:
        raise UserError(f"--lambda_value {args.lambda_value}: expected a value in [0, 1]")
    if given and not args.rerank:
        shown = ", ".join(f"--{flag} {getattr(args, flag)}" for flag in given)
        raise UserError(f"{shown}: takes effect only with --rerank (add it, or drop the flag)")
    if "k2" in given and args.k2 > args.k1:
        raise UserError(
            f"--k2 {args.k2}: expected at most --k1 {args.k1} (the query expansion averages "
            "neighbours among the k1 nearest)"
        )
