"""The LGUR training objective L = L_M + L_G (lgur-reference §2.1), configured by the `loss:` section.

    L_M = L_ID(V_g, T) + L_ID(V_re, T_re) + L_RK(S(V_g, T)) + L_RK(S(V_re, T_re))
    L_G = L_RK(S(T, T_re)) + L_RK(S(V_g, V_re))

Term names in the log: id_guided, id_dict, rank_guided, rank_dict, guide_text, guide_image ("guided"
is the pair (image raw branch, T): V_g with CMG, the plain image tokens without it; "dict" is the
retrieval pair (V_re, T_re)). Ablations drop the terms whose branches do not exist (lgur.models.lgur):
the baseline keeps id_dict + rank_dict; without CMG there is no L_G; without MSD no guide_text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lgur.errors import ConfigError
from lgur.losses.identity import part_id_losses
from lgur.losses.ranking import NEGATIVES, REDUCTIONS, TEXT_HINGES, cosine_similarity, ranking_loss


@dataclass(frozen=True)
class Term:
    name: str
    kind: str  # id | rank | guide  (selects the weight loss.id_weight / rank_weight / guide_weight)
    a: str     # branch keys of the model output
    b: str


def loss_terms(mcfg) -> list[Term]:
    """The loss terms the configured model trains with (see the module docstring)."""
    terms = []
    if mcfg.name != "baseline":
        raw = "V_g" if mcfg.use_cmg else "V" if mcfg.use_msd else None
        if raw is not None:
            terms += [Term("id_guided", "id", raw, "T"), Term("rank_guided", "rank", raw, "T")]
    terms += [Term("id_dict", "id", "V_re", "T_re"), Term("rank_dict", "rank", "V_re", "T_re")]
    if mcfg.name != "baseline" and mcfg.use_cmg:
        if mcfg.use_msd:
            terms.append(Term("guide_text", "guide", "T", "T_re"))
        terms.append(Term("guide_image", "guide", "V_g", "V_re"))
    return terms


class LGURCriterion:
    """callable(outputs, labels, model) -> (loss, {term: detached value}); no host sync inside.

    Negative sampling draws from a torch.Generator per device seeded with cfg.seed; its state is
    exposed by state_dict()/load_state_dict() so a resumed run continues the same random stream.
    `draws` (2, n_rank_terms, B, B), optional: uniform draws to use instead of the generator's (the
    ranking terms in `self.terms` order, then as lgur.losses.ranking.ranking_loss's `uniform`); tests
    replay recorded negatives with it through the same code.
    """

    def __init__(self, cfg):
        lcfg = cfg.loss
        if lcfg.negative not in NEGATIVES:
            raise ConfigError(f"loss.negative must be one of {', '.join(NEGATIVES)}, got {lcfg.negative!r}")
        if lcfg.reduction not in REDUCTIONS:
            raise ConfigError(f"loss.reduction must be one of {', '.join(REDUCTIONS)}, got {lcfg.reduction!r}")
        if lcfg.text_hinge not in TEXT_HINGES:
            raise ConfigError(f"loss.text_hinge must be one of {', '.join(TEXT_HINGES)}, got {lcfg.text_hinge!r}")
        self.margin, self.negative, self.reduction = float(lcfg.margin), lcfg.negative, lcfg.reduction
        self.text_hinge = lcfg.text_hinge
        self.weights = {"id": float(lcfg.id_weight), "rank": float(lcfg.rank_weight),
                        "guide": float(lcfg.guide_weight)}
        self.terms = [t for t in loss_terms(cfg.model) if self.weights[t.kind] != 0.0]
        self.seed = int(cfg.seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {dev: g.get_state() for dev, g in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for dev, s in state.items():
            self.generator(torch.device(dev)).set_state(s)

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, model: torch.nn.Module,
                 draws: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        missing = sorted({k for t in self.terms for k in (t.a, t.b)} - outputs.keys())
        if missing:
            raise ValueError(f"model outputs lack branches {missing} needed by the loss; model and loss "
                             "must be built from the same config")
        # the loss math runs in float32 even inside the engine's autocast region: bf16 logits over
        # thousands of identities and bf16 cosines near the margin would change which negatives count
        with torch.autocast(labels.device.type, enabled=False):
            total, logged = self._terms(outputs, labels, model, draws)
        return total, {k: v.detach() for k, v in logged.items()}

    def _terms(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, model: torch.nn.Module,
               draws: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logged: dict[str, torch.Tensor] = {}
        total = 0.0
        id_terms = [t for t in self.terms if t.kind == "id"]
        if id_terms:
            classifiers = getattr(model, "module", model).classifiers  # DDP wraps the model
            if classifiers is None:
                raise ValueError("the model has no ID classifiers (built with num_classes=0)")
            keys = list(dict.fromkeys(k for t in id_terms for k in (t.a, t.b)))
            ce, acc = part_id_losses(classifiers, [outputs[k].float() for k in keys], labels)
            ce_of, acc_of = dict(zip(keys, ce)), dict(zip(keys, acc))
            for t in id_terms:
                logged[t.name] = (ce_of[t.a] + ce_of[t.b]).mean()
            logged["acc_img"], logged["acc_txt"] = acc_of["V_re"], acc_of["T_re"]
        rank_terms = [t for t in self.terms if t.kind != "id"]
        if rank_terms:
            a = torch.stack([outputs[t.a].float().flatten(1) for t in rank_terms])
            b = torch.stack([outputs[t.b].float().flatten(1) for t in rank_terms])
            sims = cosine_similarity(a, b)  # (n_terms, B, B), image/raw side as rows
            values = ranking_loss(sims, labels, self.margin, self.negative, self.reduction, uniform=draws,
                                  generator=None if draws is not None else self.generator(sims.device),
                                  text_hinge=self.text_hinge)
            logged.update({t.name: v for t, v in zip(rank_terms, values)})
        for t in self.terms:
            total = total + self.weights[t.kind] * logged[t.name]
        logged["loss"] = total
        return total, logged


def build_criterion(cfg) -> LGURCriterion:
    """The training loss for cfg (model switches decide the terms, loss.* their options/weights)."""
    return LGURCriterion(cfg)
