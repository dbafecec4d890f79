"""Do the explanations mean what they say? Measured on a trained model over the synthetic set (not a test).

    .venv/bin/python bench/explain_semantics.py --index demo_out/gallery.lgidx --data demo_out/data [--limit 120]

For each test caption that names the colour of the person's upper garment ("... a grey sleeveless shirt ..."),
on the person's own image (an index row): k* = the prototype part that attends most to that colour word;
1. remove the colour word from the caption: how much does part k*'s contribution to the score change
   (the claim: it drops), and how often does it drop;
2. part k*'s attention over the image: which fraction lies in the upper half of the crop (the claim: most).
Chance for 2 is the fraction of patches in the upper half (0.5), or the mean over all parts for comparison.
Diagnostics: how often removing the word lowers the whole score, and when it does, how many of the K parts'
contributions fall with it (near 100 %: the parts move together, so no part can stand out in 1).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

import lgur  # noqa: F401
from lgur.models.explain import part_contributions, text_evidence
from lgur.search.explain import hit_maps
from lgur.search.searcher import Searcher

COLOURS = {"black", "white", "grey", "gray", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown",
           "beige", "navy", "dark", "light", "maroon", "khaki", "violet", "tan", "cream", "olive", "teal", "crimson"}
UPPER = {"shirt", "t-shirt", "tshirt", "top", "jacket", "coat", "sweater", "hoodie", "blouse", "tank", "vest", "polo",
         "cardigan", "sweatshirt", "jumper", "tee", "windbreaker", "parka", "blazer", "tunic"}
LOWER = {"skirt", "pants", "trousers", "jeans", "shorts", "leggings", "dress", "slacks", "joggers", "sweatpants",
         "boots", "shoes", "sneakers", "backpack", "bag", "rucksack", "hair", "sandals", "handbag", "purse"}


def upper_colour_word(words: list[str]) -> int | None:
    """Index of a colour word whose next garment noun (within 4 words) is an upper garment."""
    low = [w.lower().strip(".,;") for w in words]
    for i, w in enumerate(low):
        if w in COLOURS:
            for j in range(i + 1, min(i + 5, len(low))):
                if low[j] in UPPER:
                    return i
                if low[j] in LOWER or low[j] in COLOURS and j > i + 1:
                    break
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="demo_out/gallery.lgidx")
    ap.add_argument("--data", default="demo_out/data")
    ap.add_argument("--limit", type=int, default=120)
    args = ap.parse_args()
    s = Searcher(args.index)
    model, K = s.model, s.model.num_parts
    row = {p: i for i, p in enumerate(s.index.files.paths())}
    records = [r for r in json.loads((Path(args.data) / "reid_raw.json").read_text()) if r["split"] == "test"]
    drops, dropped, fractions, all_parts, n = [], 0, [], [], 0
    total_drops, parts_along = 0, []
    for r in records:
        rel = r["file_path"][len("test/"):] if r["file_path"].startswith("test/") else r["file_path"]
        if rel not in row:
            continue
        for cap in r["captions"]:
            ev = text_evidence(model, [cap])
            i = upper_colour_word(ev.words[0])
            if i is None or ev.word_attention is None:
                continue
            k = int(ev.word_attention[0][:, i].argmax())
            shorter = " ".join(w for j, w in enumerate(ev.words[0]) if j != i)
            img = s.index.store.take(torch.tensor([row[rel]])).float()
            full = part_contributions(img, ev.embeddings[0].float(), K)[0]
            cut = part_contributions(img, text_evidence(model, [shorter]).embeddings[0].float(), K)[0]
            drops.append(float(cut[k] - full[k]))
            if cut.sum() < full.sum():
                total_drops += 1
                parts_along.append(float((cut < full).float().mean()))
            dropped += bool(cut[k] < full[k])
            [pa], _ = hit_maps(s, [row[rel]])
            h = pa.shape[1]
            fractions.append(float(pa[k, : h // 2].sum()))
            all_parts.append(float(pa[:, : h // 2].sum(axis=(1, 2)).mean()))
            n += 1
            if n >= args.limit:
                break
        if n >= args.limit:
            break
    print(f"model {s.index.manifest['model']}, {n} test captions naming an upper-garment colour")
    print(f"removing the colour word: contribution of the part attending to it most changes by "
          f"{statistics.mean(drops):+.4f} on average (median {statistics.median(drops):+.4f}); "
          f"it drops in {dropped}/{n} = {dropped / max(n, 1):.0%}")
    print(f"removing the colour word lowers the whole score in {total_drops}/{n} = {total_drops / max(n, 1):.0%}; "
          f"when it does, {statistics.mean(parts_along or [0]):.0%} of the {K} parts' contributions fall with it")
    print(f"that part's image attention in the upper half of the crop: mean {statistics.mean(fractions):.2f} "
          f"(median {statistics.median(fractions):.2f}; > 0.5 in {sum(f > 0.5 for f in fractions)}/{n}); "
          f"all parts' mean {statistics.mean(all_parts):.2f}")


if __name__ == "__main__":
    main()
