"""Evaluation protocols: ``.bin`` pair verification (:mod:`facems.protocols.pairs`)."""

from facems.protocols.pairs import PairResult, evaluate_pairs, verify_bin

__all__ = ["PairResult", "evaluate_pairs", "verify_bin"]
