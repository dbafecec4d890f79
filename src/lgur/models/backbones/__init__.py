"""Backbones of LGUR: the image token extractor and the text encoder (interface used by lgur.models).

    from lgur.models.backbones import build_image_backbone, build_text_encoder

    image = build_image_backbone(cfg.model, cfg.data.image_size, pretrained)   # NOTE: image_size argument
    image(images (B,3,H,W)) -> (B, N, cfg.model.dim);  image.mean, image.std: normalisation (tuples)
    text = build_text_encoder(cfg.model, pretrained)
    text(input_ids (B,L), attention_mask (B,L)) -> (B, longest caption, cfg.model.dim), padded steps 0
    text.tokenizer: HF tokenizer;  text.encode_hidden(bert_hidden, lengths): the post-BERT path

pretrained=False builds the architecture only, reads no file and does not warn: use it when the weights
come from a model file afterwards. Module names follow the official checkpoint so a converter maps
`ImageExtract.model.*` -> `image.model.*` (timm names; we build no `blocks.11`, `norm`, `fc`),
`TextExtract.text_embed.*` -> `text.backbone.*` (we build no BERT `pooler.*`: it is never used) and
`TextExtract.lstm.*` -> `text.lstm.*`.
"""
from lgur.models.backbones.image import IMAGE_BACKBONES, ImageBackbone, build_image_backbone
from lgur.models.backbones.text import TEXT_BACKBONES, TextEncoder, build_text_encoder, load_tokenizer

__all__ = ["IMAGE_BACKBONES", "ImageBackbone", "TEXT_BACKBONES", "TextEncoder", "build_image_backbone",
           "build_text_encoder", "load_tokenizer"]
