"""LGUR losses: per-part ID loss, vectorised random semi-hard ranking loss, and their combination.

    from lgur.losses import build_criterion
    criterion = build_criterion(cfg)
    loss, logged = criterion(model(images, ids, mask), labels, model)
"""
from lgur.losses.criterion import LGURCriterion, Term, build_criterion, loss_terms
from lgur.losses.identity import part_id_losses
from lgur.losses.ranking import (TEXT_HINGES, candidate_mask, cosine_similarity, ranking_loss, select_negatives,
                                triplet_hinge)

__all__ = ["LGURCriterion", "TEXT_HINGES", "Term", "build_criterion", "candidate_mask", "cosine_similarity",
           "loss_terms", "part_id_losses", "ranking_loss", "select_negatives", "triplet_hinge"]
