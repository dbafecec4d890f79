"""Person search: gallery index, exact/ANN search, results sheets, web server and ONNX export.

    lgur index --checkpoint model.safetensors --images photos/ --out gallery.lgidx
    lgur search --index gallery.lgidx "a man in a black jacket with a red backpack" -k 10 --html out.html
    lgur search --index gallery.lgidx "a man in a red jacket" --where camera=3 --after 2026-11-28T14:00

    from lgur.search import Searcher
    results = Searcher("gallery.lgidx").search(["a woman in a white dress"], k=10)

Names resolve lazily so the `lgur` command's parser does not import torch.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "GalleryIndex": "index", "build_index": "build", "BuildReport": "index", "SearchError": "index",
    "Rows": "index", "IndexWriter": "index", "PathPattern": "index", "read_sidecar": "index", "Filter": "filters",
    "Searcher": "searcher", "Hit": "searcher", "QueryResult": "searcher",
    "ExactSearch": "topk", "TwoStageSearch": "ann", "write_html": "sheet", "write_png": "sheet",
    "create_app": "server", "export_onnx": "export",
})
