"""Official LGUR checkpoint (`best.pth.tar`) -> lgur model file (`lgur convert-official`).

The official file is a dict {'network': state dict, 'W': state dict of the 6 ID classifiers,
'optimizer', 'epoch', 'test_best'} (docs/reference.md §9.1); a bare network state dict is accepted too.
It is read through lgur.files.read_torch (torch.load(weights_only=True)); the only globals admitted beyond tensors are numpy's
scalar/dtype reconstructors, because the official `test_best` is a numpy float64.
Official names -> lgur names (the lgur side is built from the modules' paths in lgur.models.parts):

    TXTDecoder_2.transformer.layers.i.0.fn.norm.*        -> dga.recon.layers.i.attn.norm.*     (R)
    TXTDecoder_2.transformer.layers.i.0.fn.fn.to_q/to_kv -> dga.recon.layers.i.attn.to_q/to_kv
    TXTDecoder_2.transformer.layers.i.0.fn.fn.to_out.0.* -> dga.recon.layers.i.attn.to_out.*
    TXTDecoder_2.transformer.layers.i.1.fn.norm.*        -> dga.recon.layers.i.ffn.norm.*
    TXTDecoder_2.transformer.layers.i.1.fn.fn.net.0/3.*  -> dga.recon.layers.i.ffn.fc1/fc2.*
    TXTDecoder.*                                         -> decoder.block.* (same pattern, Pdec)
    dict_feature (1,s,d) / query_embed_image (1,K,d)     -> dga.dictionary.atoms / decoder.prototypes
    mask.0.*                                             -> dga.gate.proj.*
    conv_1X1_2.k.block.0.weight (E,d,1,1), k = 0..K-1    -> proj.weight[k]           (K,E,d)
    W: k.W.block.weight / bias (C,E) / (C,)              -> classifiers.weight[k] / bias[k]
    TextExtract.lstm.*                                   -> text.lstm.*
    TextExtract.text_embed.*  (BERT)                     -> text.backbone.*
    ImageExtract.model.*      (TransReID DeiT = timm)    -> image.model.*

Dropped on purpose because no official forward reads them: `pos_embed_image`, the DeiT blocks
beyond those our backbone builds (the official forward runs blocks[:-1]), the DeiT final `norm` and
`fc`, the BERT pooler and BERT's position/token-type id buffers. Any other official key that maps
nowhere, and any model key left unfilled, is an error that names them.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from lgur.config import Config, load_config
from lgur.errors import WeightsError
from lgur.files import read_torch
from lgur.models.build import build_model
from lgur.models.checkpoint import save_model
from lgur.models.parts import (BILSTM, CLASSIFIERS, DICTIONARY, GATE, IMAGE_BACKBONE, PDEC, PROJECTIONS, PROTOTYPES,
                               TEXT_BACKBONE, R)

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(TXTDecoder_2|TXTDecoder)\.transformer\.layers\.(\d+)\.([01])\.fn\.(.+)$")
_BLOCK_PREFIX = {"TXTDecoder_2": R.path, "TXTDecoder": PDEC.path}
_SUBLAYER = {  # (sub-layer index, official tail) -> our tail
    ("0", "norm.weight"): "attn.norm.weight", ("0", "norm.bias"): "attn.norm.bias",
    ("0", "fn.to_q.weight"): "attn.to_q.weight", ("0", "fn.to_kv.weight"): "attn.to_kv.weight",
    ("0", "fn.to_out.0.weight"): "attn.to_out.weight", ("0", "fn.to_out.0.bias"): "attn.to_out.bias",
    ("1", "norm.weight"): "ffn.norm.weight", ("1", "norm.bias"): "ffn.norm.bias",
    ("1", "fn.net.0.weight"): "ffn.fc1.weight", ("1", "fn.net.0.bias"): "ffn.fc1.bias",
    ("1", "fn.net.3.weight"): "ffn.fc2.weight", ("1", "fn.net.3.bias"): "ffn.fc2.bias",
}
_DICTIONARY, _PROTOTYPES = f"{DICTIONARY.path}.atoms", PROTOTYPES.path  # (1, s, d) / (1, K, d) officially
_PLAIN = {"dict_feature": _DICTIONARY, "query_embed_image": _PROTOTYPES,
          "mask.0.weight": f"{GATE.path}.proj.weight", "mask.0.bias": f"{GATE.path}.proj.bias"}
_PROJECTIONS, _LSTM_PROBE = f"{PROJECTIONS.path}.weight", f"{BILSTM.path}.weight_ih_l0"
_PART = re.compile(r"^conv_1X1_2\.(\d+)\.block\.0\.weight$")
_CLASSIFIER = re.compile(r"^(\d+)\.W\.block\.(weight|bias)$")
_IMAGE_MODEL = f"{IMAGE_BACKBONE.path}.model."  # lgur.models.backbones.image.ImageBackbone.model
_PREFIXES = {"TextExtract.lstm.": f"{BILSTM.path}.", "TextExtract.text_embed.": f"{TEXT_BACKBONE.path}.",
             "ImageExtract.model.": _IMAGE_MODEL}
_IMAGE_BLOCK = re.compile(rf"^{re.escape(_IMAGE_MODEL)}blocks\.(\d+)\.")
_UNUSED = re.compile(r"^(pos_embed_image|ImageExtract\.model\.(norm|fc)\..+|TextExtract\.text_embed\."
                     r"(pooler\..+|embeddings\.(position_ids|token_type_ids)))$")


def _stack_parts(parts: dict[int, torch.Tensor], what: str) -> torch.Tensor:
    if sorted(parts) != list(range(len(parts))):
        raise WeightsError(f"official {what}: part indices {sorted(parts)} are not 0..K-1")
    return torch.stack([parts[k] for k in range(len(parts))])


def map_official_state(network: dict[str, torch.Tensor], classifiers: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename/reshape official tensors to lgur names. Returns (mapped, ignored, unmapped).

    `ignored`: official keys no forward reads (dropped on purpose); `unmapped`: keys no rule knows.
    Every DeiT block is mapped; `drop_unbuilt_blocks` drops the ones our backbone does not build.
    """
    out: dict[str, torch.Tensor] = {}
    ignored, unmapped = [], []
    projections: dict[int, torch.Tensor] = {}
    for key, value in network.items():
        if m := _BLOCK.match(key):
            tail = _SUBLAYER.get((m.group(3), m.group(4)))
            if tail is None:
                unmapped.append(key)
            else:
                out[f"{_BLOCK_PREFIX[m.group(1)]}.layers.{m.group(2)}.{tail}"] = value
        elif key in _PLAIN:
            out[_PLAIN[key]] = value[0] if key in ("dict_feature", "query_embed_image") else value
        elif m := _PART.match(key):
            projections[int(m.group(1))] = value[:, :, 0, 0]
        elif _UNUSED.match(key):
            ignored.append(key)
        else:
            prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
            if prefix is None:
                unmapped.append(key)
            else:
                out[_PREFIXES[prefix] + key[len(prefix):]] = value
    if projections:
        out[_PROJECTIONS] = _stack_parts(projections, "conv_1X1_2")
    if classifiers:
        parts: dict[str, dict[int, torch.Tensor]] = {"weight": {}, "bias": {}}
        for key, value in classifiers.items():
            if m := _CLASSIFIER.match(key):
                parts[m.group(2)][int(m.group(1))] = value
            else:
                unmapped.append(f"W:{key}")
        for name, by_part in parts.items():
            if by_part:
                out[f"{CLASSIFIERS.path}.{name}"] = _stack_parts(by_part, f"W {name}")
    return {k: v.contiguous() for k, v in out.items()}, sorted(ignored), sorted(unmapped)


def drop_unbuilt_blocks(mapped: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """Remove (in place) the official DeiT blocks beyond the last one our backbone builds (the official
    forward runs blocks[:-1], so the 12th is never read); returns their official names."""
    built = [int(m.group(1)) for k in own if (m := _IMAGE_BLOCK.match(k))]
    if not built:
        return []
    extra = [k for k in mapped if (m := _IMAGE_BLOCK.match(k)) and int(m.group(1)) > max(built)]
    for k in extra:
        del mapped[k]
    return sorted("ImageExtract.model." + k[len(_IMAGE_MODEL):] for k in extra)


def _infer_block(mapped: dict[str, torch.Tensor], prefix: str, heads: int, what: str) -> dict[str, int]:
    """Depth, FFN width and head width of a cross-attention block from its weights (heads from config)."""
    depth = len({k.split(".")[3] for k in mapped if k.startswith(prefix + ".layers.")})
    if depth == 0:
        raise WeightsError(f"the official checkpoint has no {what} weights")
    inner = mapped[f"{prefix}.layers.0.attn.to_q.weight"].shape[0]
    if inner % heads:
        raise WeightsError(f"{what}: inner width {inner} is not divisible by {heads} heads (set the heads "
                           "with --set model.*_heads=N)")
    return {"depth": depth, "ffn": mapped[f"{prefix}.layers.0.ffn.fc1.weight"].shape[0], "head_dim": inner // heads}


def official_config(mapped: dict[str, torch.Tensor], base: Config) -> Config:
    """`base` (defaults = the official recipe, or a given recipe) with the head widths read from the
    weights; backbones, image size and head counts come from `base` and are checked when loading."""
    cfg = Config(base.to_dict())
    m = cfg.model
    m.name, m.use_msd, m.use_cmg, m.use_fcr, m.use_pgu = "lgur", True, True, True, True
    m.image_weights = m.text_weights = None
    try:
        atoms, prototypes, proj = mapped[_DICTIONARY], mapped[_PROTOTYPES], mapped[_PROJECTIONS]
    except KeyError as e:
        raise WeightsError(f"the official checkpoint lacks the LGUR head tensor for {e}") from None
    m.dict_size, m.dim = atoms.shape
    m.num_prototypes, m.embed_dim = prototypes.shape[0], proj.shape[1]
    recon = _infer_block(mapped, R.path, m.recon_heads, "TXTDecoder_2 (R)")
    pgu = _infer_block(mapped, PDEC.path, m.pgu_heads, "TXTDecoder (Pdec)")
    m.recon_depth, m.recon_ffn, m.recon_head_dim = recon["depth"], recon["ffn"], recon["head_dim"]
    m.pgu_depth, m.pgu_ffn, m.pgu_head_dim = pgu["depth"], pgu["ffn"], pgu["head_dim"]
    m.lstm = _LSTM_PROBE in mapped
    return cfg


def _numpy_scalar_globals() -> list:
    """Allow-list for the weights_only unpickler: the official script stores `test_best` as a numpy
    float64 (its R@1, `cmc[0]`), pickled as numpy.core.multiarray.scalar(dtype, bytes). Rebuilding a
    numpy scalar from a dtype and raw bytes runs no code, so these (and nothing else) are admitted."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32))]


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """(network state dict, classifier state dict or None, other scalar entries) of an official file."""
    path = Path(path).expanduser()
    obj = read_torch(path, "an official LGUR checkpoint", safe_globals=_numpy_scalar_globals())
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict, got {type(obj).__name__}")
    if isinstance(obj.get("network"), dict):
        network, classifiers = obj["network"], obj.get("W")
    else:  # a bare network state dict
        network, classifiers = obj, None
    extra = {k: v.item() if hasattr(v, "item") else v for k, v in obj.items()
             if isinstance(v, (int, float, str)) and not isinstance(v, bool)}  # numpy float64 -> float
    return network, classifiers if isinstance(classifiers, dict) else None, extra


def convert_official(src: str | Path, dst: str | Path, config: str | Path | None = None,
                     overrides: tuple[str, ...] = (), ignore_unmapped: bool = False) -> dict:
    """Convert an official LGUR checkpoint into an lgur model file; returns a report dict.

    `config`/`overrides` give what the weights cannot tell (backbone names, image size, head counts);
    the defaults are the official model. Unmapped official keys raise unless `ignore_unmapped`.
    """
    network, classifiers, extra = read_official_checkpoint(src)
    mapped, ignored, unmapped = map_official_state(network, classifiers)
    if unmapped and not ignore_unmapped:
        raise WeightsError(f"{src}: {len(unmapped)} official key(s) map to nothing: {', '.join(unmapped[:10])}"
                           f"{' ...' if len(unmapped) > 10 else ''} (--ignore-unmapped drops them)")
    for key in unmapped:
        log.warning("dropped unmapped official key %s", key)
    cfg = official_config(mapped, load_config(config, overrides))
    num_classes = mapped[f"{CLASSIFIERS.path}.weight"].shape[1] if f"{CLASSIFIERS.path}.weight" in mapped else 0
    model = build_model(cfg, num_classes=num_classes, pretrained=False)
    own = model.state_dict()
    ignored += drop_unbuilt_blocks(mapped, own)
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    mismatched = [f"{k}: official {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(mapped)) if own[k].shape != mapped[k].shape]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{src}: the official weights do not fit the model built from the config "
            f"(image {cfg.model.image_backbone} at {cfg.data.image_size}, text {cfg.model.text_backbone}): "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}, shapes {mismatched[:4]}")
    model.load_state_dict(mapped, strict=True)
    if ignored:
        log.info("dropped %d official tensors that no forward reads: %s", len(ignored), ", ".join(ignored))
    fingerprint = save_model(model, cfg, dst, num_classes,
                             extra={"converted_from": Path(src).name, "official": extra})
    return {"output": str(dst), "tensors": len(mapped), "ignored": ignored, "unmapped_dropped": unmapped,
            "num_classes": num_classes, "fingerprint": fingerprint, "official": extra}
