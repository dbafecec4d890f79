"""What a model is made of, declared once: its modules, its training branches and the loss terms.

A model class describes itself for a config (`LGUR.describe(mcfg)`, `Baseline.describe(mcfg)`; by
name: `lgur.models.variants.model_parts(mcfg)`) as a `ModelParts`:

    modules   the paper modules it builds: parameter-name paths, the `lgur info` label and the
              optimiser's learning-rate key (`optim.lr_backbone`, `optim.lr_heads`, `optim.lr`)
    branches  the part stacks its training forward returns, image side first
    terms     the loss terms over those branches (id | rank | guide, weighted by loss.*_weight)

and everything that needs to know reads it: the model builds exactly the listed modules (a parameter
no module claims stops the constructor) and `LGUR.heads` computes exactly the listed branches; the
criterion (lgur.losses.criterion) computes the terms of the model it is handed; the optimiser
(lgur.engine.optim) puts each parameter in its module's learning-rate group; `lgur info`
(lgur.models.info) counts per module; the official converter (lgur.models.convert) writes into the
modules' paths. A term over a branch the model does not return cannot be declared (ModelParts
refuses it), so model and loss cannot disagree.

Branch keys have one meaning each (docs/reference.md §1):

    V_re  image retrieval branch: R(V, D) * M with MSD + FCR, each factor dropped when its switch is off
    T_re  text retrieval branch: R(T, D) with MSD, else the text tokens
    V_g   text-guided image branch R(V, T) * M (CMG, training only)
    V     the plain image tokens (the raw image branch with MSD but without CMG)
    T     the plain text tokens (the raw text branch); without MSD it is the same tensor as T_re
"""
from __future__ import annotations

from dataclasses import dataclass

from lgur.errors import ConfigError

LR_KEYS = ("lr_backbone", "lr_heads", "lr")  # the optim.* learning rates, in parameter-group order
SIDES = ("image", "text")
TERM_KINDS = ("id", "rank", "guide")  # select the weight loss.id_weight / rank_weight / guide_weight


@dataclass(frozen=True)
class Module:
    """A paper module: the parameters whose names are one of `paths` or start with `path + '.'`."""
    key: str                # its name in `lgur info --json`
    label: str              # its row in `lgur info`
    paths: tuple[str, ...]  # module paths inside the model, e.g. 'dga.recon'
    lr: str                 # the optim.* key of its learning rate

    @property
    def path(self) -> str:
        return self.paths[0]

    def owns(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.paths)


# Every module a model of this package may build, in `lgur info` order (paper order).
IMAGE_BACKBONE = Module("image_backbone", "image backbone", ("image",), "lr_backbone")  # incl. its width Linear
# the text backbone reaches the optimiser only with model.freeze_text=false
TEXT_BACKBONE = Module("text_backbone", "text backbone (BERT)", ("text.backbone",), "lr_backbone")
BILSTM = Module("bilstm", "BiLSTM", ("text.lstm",), "lr")
TEXT_PROJECTION = Module("text_projection", "text projection (no BiLSTM)", ("text.proj",), "lr")  # model.lstm=false
R = Module("R", "R (DGA reconstruction block)", ("dga.recon",), "lr_heads")
PDEC = Module("Pdec", "Pdec (PGU decoder)", ("decoder.block",), "lr_heads")
PROJECTIONS = Module("projections", "part projections", ("proj",), "lr")
DICTIONARY = Module("dictionary", "shared dictionary D", ("dga.dictionary",), "lr_heads")
PROTOTYPES = Module("prototypes", "prototypes", ("decoder.prototypes",), "lr_heads")
GATE = Module("gate", "foreground gate M", ("dga.gate",), "lr_heads")
CLASSIFIERS = Module("classifiers", "ID classifiers", ("classifiers",), "lr")
CATALOGUE = (IMAGE_BACKBONE, TEXT_BACKBONE, BILSTM, TEXT_PROJECTION, R, PDEC, PROJECTIONS, DICTIONARY,
             PROTOTYPES, GATE, CLASSIFIERS)
MODULE = {m.key: m for m in CATALOGUE}


def lgur_heads(mcfg) -> set[str]:
    """Keys of the head modules LGUR builds for its ablation switches: R with MSD or CMG (it is shared by
    both paths), the dictionary D with MSD, the gate M with FCR, Pdec and its prototypes with PGU. Read by
    LGUR.describe and by the DGA module, which builds its R, D and M from it."""
    msd, cmg, fcr, pgu = bool(mcfg.use_msd), bool(mcfg.use_cmg), bool(mcfg.use_fcr), bool(mcfg.use_pgu)
    on = {R.key: msd or cmg, DICTIONARY.key: msd, GATE.key: fcr, PDEC.key: pgu, PROTOTYPES.key: pgu}
    return {key for key, built in on.items() if built}


@dataclass(frozen=True)
class Branch:
    """A (B, K, embed_dim) part stack of the training forward."""
    key: str
    side: str                   # image | text: which projection and key mask PGU uses
    same_as: str | None = None  # computed by no head: the same tensor as that branch


@dataclass(frozen=True)
class Term:
    """One loss term: `kind` over the branch pair (a, b); a is the image (or raw) side."""
    name: str  # its name in the training log
    kind: str  # id | rank | guide
    a: str
    b: str


@dataclass(frozen=True)
class ModelParts:
    """One model's modules, branches and loss terms (see the module docstring). Checked when made."""
    model: str                      # the registered model name (model.name)
    modules: tuple[Module, ...]
    branches: tuple[Branch, ...]
    terms: tuple[Term, ...]

    def __post_init__(self):
        keys = [b.key for b in self.branches]
        problems = []
        if len(set(keys)) != len(keys):
            problems.append(f"branch keys repeat: {keys}")
        problems += [f"branch {b.key}: side {b.side!r}" for b in self.branches if b.side not in SIDES]
        problems += [f"branch {b.key} is the same as {b.same_as}, which is not computed"
                     for b in self.branches if b.same_as is not None and b.same_as not in
                     {c.key for c in self.branches if c.same_as is None}]
        for t in self.terms:
            if t.kind not in TERM_KINDS:
                problems.append(f"term {t.name}: kind {t.kind!r}")
            problems += [f"term {t.name} pairs branch {k}, which the model does not return"
                         for k in (t.a, t.b) if k not in keys]
        if self.terms and not {"V_re", "T_re"} <= set(keys):
            problems.append("a trained model returns the retrieval branches V_re and T_re")
        paths = [p for m in self.modules for p in m.paths]
        problems += [f"module path {p} is claimed twice" for p in sorted(set(paths)) if paths.count(p) > 1]
        problems += [f"module {m.key}: learning rate {m.lr!r}" for m in self.modules if m.lr not in LR_KEYS]
        if problems:
            raise ValueError(f"model {self.model!r}: inconsistent parts description: " + "; ".join(problems))

    def builds(self, key: str) -> bool:
        """Whether the module with this key (e.g. 'R', 'gate') is part of the model."""
        return any(m.key == key for m in self.modules)

    def module_of(self, name: str) -> Module | None:
        """The module a parameter (or any dotted name inside the model) belongs to; the longest path wins."""
        best, depth = None, -1
        for m in self.modules:
            for p in m.paths:
                if (name == p or name.startswith(p + ".")) and p.count(".") > depth:
                    best, depth = m, p.count(".")
        return best

    def lr_key(self, name: str) -> str:
        """The optim.* learning-rate key of a parameter; ConfigError when no module claims it."""
        module = self.module_of(name)
        if module is None:
            raise ConfigError(f"parameter '{name}' belongs to no module of the {self.model!r} model's parts "
                              "description, so to no optimiser group: declare its module in "
                              "lgur.models.parts and the model's describe()")
        return module.lr

    def branch_keys(self, side: str | None = None, computed: bool = False) -> tuple[str, ...]:
        """Branch keys (of one side; only those a head computes when `computed`), in declared order."""
        return tuple(b.key for b in self.branches if (side is None or b.side == side)
                     and not (computed and b.same_as is not None))

    def unclaimed(self, names) -> list[str]:
        """The names (e.g. of a model's parameters) that no declared module claims."""
        return [n for n in names if self.module_of(n) is None]
