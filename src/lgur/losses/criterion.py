"""The LGUR training objective L = L_M + L_G (docs/reference.md §2.1), configured by the `loss:` section.

    L_M = L_ID(V_g, T) + L_ID(V_re, T_re) + L_RK(S(V_g, T)) + L_RK(S(V_re, T_re))
    L_G = L_RK(S(T, T_re)) + L_RK(S(V_g, V_re))

Term names in the log: id_guided, id_dict, rank_guided, rank_dict, guide_text, guide_image ("guided"
is the pair (image raw branch, T): V_g with CMG, the plain image tokens without it; "dict" is the
retrieval pair (V_re, T_re)). Which terms a model trains with is part of the model's description
(`model.parts.terms`, lgur.models.parts): ablations drop the terms whose branches do not exist, the
baseline keeps id_dict + rank_dict, without CMG there is no L_G, without MSD no guide_text. The
criterion computes the terms of the model it is handed, so model and loss cannot disagree; `loss.*`
gives the options and the weights (a term of weight 0 is not computed).
"""
from __future__ import annotations

import torch

from lgur.errors import ConfigError
from lgur.losses.identity import part_id_losses
from lgur.losses.ranking import NEGATIVES, REDUCTIONS, TEXT_HINGES, cosine_similarity, ranking_loss
from lgur.models.variants import model_parts
from lgur.models.parts import ModelParts, Term

__all__ = ["LGURCriterion", "Term", "build_criterion", "loss_terms"]


def loss_terms(mcfg) -> list[Term]:
    """The loss terms a model built from `mcfg` trains with (its parts description)."""
    return list(model_parts(mcfg).terms)


class LGURCriterion:
    """callable(outputs, labels, model) -> (loss, {term: detached value}); no host sync inside.

    The terms are those of `model.parts` (the model the loss is applied to; DDP-wrapped is fine) with
    a non-zero weight; `self.terms` are the ones of the configured model (cfg.model), used for a model
    that carries no description (e.g. a bare holder of `classifiers`).

    Negative sampling draws from a torch.Generator per device seeded with cfg.seed; its state is
    exposed by state_dict()/load_state_dict() so a resumed run continues the same random stream.
    `draws` (2, n_rank_terms, B, B), optional: uniform draws to use instead of the generator's (the
    ranking terms in the order of the model's terms, then as lgur.losses.ranking.ranking_loss's `uniform`); tests
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
        self._terms_of: dict[ModelParts, list[Term]] = {}
        self.terms = self._weighted(model_parts(cfg.model))
        self.seed = int(cfg.seed)
        self._generators: dict[str, torch.Generator] = {}

    def _weighted(self, parts: ModelParts) -> list[Term]:
        """The terms of `parts` with a non-zero weight, in declared order (cached per description)."""
        if parts not in self._terms_of:
            self._terms_of[parts] = [t for t in parts.terms if self.weights[t.kind] != 0.0]
        return self._terms_of[parts]

    def terms_for(self, model: torch.nn.Module) -> list[Term]:
        """The weighted terms `model` trains with: from its parts description, else the configured ones."""
        parts = getattr(getattr(model, "module", model), "parts", None)  # DDP wraps the model
        return self._weighted(parts) if isinstance(parts, ModelParts) else self.terms

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
        terms = self.terms_for(model)
        missing = sorted({k for t in terms for k in (t.a, t.b)} - outputs.keys())
        if missing:  # only outputs made by hand can lack them: a model returns the branches of its terms
            raise ValueError(f"outputs lack branches {missing} needed by the loss terms "
                             f"{[t.name for t in terms]}")
        # the loss math runs in float32 even inside the engine's autocast region: bf16 logits over
        # thousands of identities and bf16 cosines near the margin would change which negatives count
        with torch.autocast(labels.device.type, enabled=False):
            total, logged = self._terms(terms, outputs, labels, model, draws)
        return total, {k: v.detach() for k, v in logged.items()}

    def _terms(self, terms: list[Term], outputs: dict[str, torch.Tensor], labels: torch.Tensor,
               model: torch.nn.Module, draws: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logged: dict[str, torch.Tensor] = {}
        total = 0.0
        id_terms = [t for t in terms if t.kind == "id"]
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
        rank_terms = [t for t in terms if t.kind != "id"]
        if rank_terms:
            a = torch.stack([outputs[t.a].float().flatten(1) for t in rank_terms])
            b = torch.stack([outputs[t.b].float().flatten(1) for t in rank_terms])
            sims = cosine_similarity(a, b)  # (n_terms, B, B), image/raw side as rows
            values = ranking_loss(sims, labels, self.margin, self.negative, self.reduction, uniform=draws,
                                  generator=None if draws is not None else self.generator(sims.device),
                                  text_hinge=self.text_hinge)
            logged.update({t.name: v for t, v in zip(rank_terms, values)})
        for t in terms:
            total = total + self.weights[t.kind] * logged[t.name]
        logged["loss"] = total
        return total, logged


def build_criterion(cfg) -> LGURCriterion:
    """The training loss for cfg (model switches decide the terms, loss.* their options/weights)."""
    return LGURCriterion(cfg)
