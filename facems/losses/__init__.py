"""Pair losses on a cosine-similarity matrix: Multi-Similarity and the GPW family, and their
cross-rank form."""

from facems.losses.distributed import CrossRankLoss, all_gather_no_grad, all_gather_with_grad
from facems.losses.gpw import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    LiftedStructureLoss,
    TripletLoss,
    binomial_deviance_loss,
    contrastive_loss,
    lifted_structure_loss,
    triplet_all_loss,
    triplet_batch_hard_loss,
)
from facems.losses.margin import MarginHead, margin_logits, margin_softmax_loss
from facems.losses.multi_similarity import MultiSimilarityLoss, ms_loss, ms_mine
from facems.losses.pairs import PairLoss, cosine_similarity_matrix, label_masks
from facems.losses.xbm import CrossBatchMemory, xbm_loss

__all__ = [
    "BinomialDevianceLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "CrossRankLoss",
    "LiftedStructureLoss",
    "MarginHead",
    "MultiSimilarityLoss",
    "PairLoss",
    "TripletLoss",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "binomial_deviance_loss",
    "contrastive_loss",
    "cosine_similarity_matrix",
    "label_masks",
    "lifted_structure_loss",
    "margin_logits",
    "margin_softmax_loss",
    "ms_loss",
    "ms_mine",
    "triplet_all_loss",
    "triplet_batch_hard_loss",
    "xbm_loss",
]
