"""Evaluation protocols: ``.bin`` pair verification (:mod:`facems.protocols.pairs`), IJB-B/IJB-C 1:1 and
1:N (:mod:`facems.protocols.ijb`), retrieval Recall@K / MAP@R (:mod:`facems.protocols.retrieval`)."""

from facems.protocols.pairs import PairResult, evaluate_pairs, verify_bin

__all__ = ["PairResult", "evaluate_pairs", "verify_bin"]
