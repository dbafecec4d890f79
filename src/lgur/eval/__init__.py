"""Retrieval evaluation: memory-bounded R@k / mAP / mINP / LGUR trapezoid mAP (see lgur.eval.metrics).

    from lgur.eval import retrieval_metrics
    metrics = retrieval_metrics(text_feats, image_feats, caption_pids, image_pids)   # t2i
    metrics["R@1"], metrics["mAP"], metrics["mAP_lgur_trapezoid"]
"""
from lgur.eval.metrics import RANK_METRICS, retrieval_metrics, similarity_metrics, text_image_metrics
from lgur.eval.table import format_table

__all__ = ["RANK_METRICS", "format_table", "retrieval_metrics", "similarity_metrics", "text_image_metrics"]
