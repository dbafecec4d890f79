"""No host sync in the training step, checked without a GPU.

On a GPU, `.item()`, `.cpu()`, `.tolist()`, `bool(tensor)` (Python branching on a value), data-dependent
shapes and blocking host->device copies make the CPU wait for the GPU. The 'meta' device has shapes but
no data, so each of those raises there; a TorchFunctionMode additionally records blocking host->device
copies (which meta accepts but CUDA serialises). The step below is the engine's own TrainStep (model,
all six loss terms, gradient clipping, Adam) fed by DeviceAugment, as in training with data.cache_images.
tests/test_cuda.py repeats this on a real GPU with torch.cuda.set_sync_debug_mode("error").
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lgur.config import load_config
from lgur.data.datasets import Collate
from lgur.data.transforms import DeviceAugment
from lgur.engine.optim import build_optimizer
from lgur.engine.trainer import TrainStep
from lgur.losses import build_criterion
from lgur.models import build_model

META = torch.device("meta")


class BlockingCopies(TorchFunctionMode):
    """Records host->device copies made without non_blocking=True, and tensors built from Python data
    directly on the device (torch.tensor(x, device=...) copies from pageable memory and waits)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        to_device = isinstance(out, torch.Tensor) and out.device.type != "cpu"
        if func in (torch.Tensor.to, torch.Tensor.cuda) and src is not None and src.device.type == "cpu" and to_device:
            if not kwargs.get("non_blocking", any(a is True for a in args[1:])):
                self._record(f"blocking {func.__name__}() of a CPU tensor {tuple(src.shape)}")
        elif func is torch.Tensor.copy_ and src is not None and src.device.type != "cpu" \
                and isinstance(args[1], torch.Tensor) and args[1].device.type == "cpu":
            if not kwargs.get("non_blocking", len(args) > 2 and args[2]):
                self._record("blocking copy_() from a CPU tensor")
        elif func in (torch.tensor, torch.as_tensor) and to_device and not (args and isinstance(args[0], torch.Tensor)):
            self._record(f"{func.__name__}(python data) built on {out.device}")
        return out

    def _record(self, what: str) -> None:
        where = [f for f in traceback.extract_stack()[:-2] if "/lgur/" in f.filename]
        self.found.append(what + (f" at {where[-1].filename}:{where[-1].lineno}" if where else ""))


@pytest.fixture
def meta_step(monkeypatch):
    """(step, augment, batch on 'meta' + CPU lengths). Autocast and torch.Generator know no 'meta'
    device: the autocast region becomes a no-op there and the random draws use the default generator
    (neither changes which operations run)."""
    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    cfg = load_config("lgur_tiny")
    torch.manual_seed(0)
    model = build_model(cfg, 6, pretrained=False).to(META).train()
    criterion = build_criterion(cfg)
    criterion.generator = lambda device: None
    optimizer = build_optimizer(model, cfg.optim)
    step = TrainStep(model, model, criterion, optimizer, META, torch.bfloat16, grad_clip=1.0)
    augment = DeviceAugment(model.image_mean, model.image_std, pad=4, flip=True).to(META).train()
    augment.generator = lambda device: None
    lengths = torch.tensor([12, 5, 9, 7, 12, 3])
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = torch.randint(1000, 5000, (6, 12)) * mask
    images = torch.randint(0, 256, (6, 3, *cfg.data.image_size), dtype=torch.uint8)
    batch = dict(images=images.to(META), input_ids=ids.to(META), attention_mask=mask.to(META),
                 labels=torch.tensor([0, 1, 2, 0, 1, 5]).to(META), lengths=lengths)
    return step, augment, batch


def test_training_step_makes_no_host_sync(meta_step):
    """Several full steps with every step tensor on 'meta' (only the collate's lengths on the CPU):
    any .item()/.cpu()/bool(tensor) raises, blocking host->device copies are recorded."""
    step, augment, b = meta_step
    with BlockingCopies() as guard:
        for _ in range(3):
            logged = step(augment(b["images"]), b["input_ids"], b["attention_mask"], b["labels"], b["lengths"])
    assert guard.found == []
    assert {"loss", "rank_dict", "id_dict", "guide_image"} <= logged.keys()
    assert all(v.device == META for v in logged.values())  # logged terms stay on the device


def test_the_check_catches_syncs(meta_step):
    """The same step without the CPU lengths must count them from the device mask: caught. So is a
    blocking host->device copy."""
    step, augment, b = meta_step
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        step(augment(b["images"]), b["input_ids"], b["attention_mask"], b["labels"])
    with BlockingCopies() as guard:
        torch.arange(3).to(META)
        torch.arange(3).to(META, non_blocking=True)
        torch.tensor([1.0, 2.0], device=META)
    assert len(guard.found) == 2


def test_evaluation_encoders_make_no_host_sync(meta_step):
    step, augment, b = meta_step
    model = step.core.eval()
    with BlockingCopies() as guard, torch.no_grad():
        images = model.encode_images(augment.eval()(b["images"]))
        texts = model.encode_texts(b["input_ids"], b["attention_mask"], b["lengths"])
    assert guard.found == []
    assert images.shape == texts.shape == (6, model.embedding_dim)


def test_lengths_from_the_collate_function_drive_packing():
    """Collate's CPU lengths = mask sums; the encoder gives the same output with them as from the mask
    (no caption padded, some padded, ties), matches torch's own enforce_sorted=False packing, and
    refuses lengths that live on another device."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    cfg = load_config("lgur_tiny")
    torch.manual_seed(0)
    enc = build_model(cfg, 0, pretrained=False).text.eval()
    seqs = [torch.randint(1000, 5000, (n,)) for n in (7, 3, 7, 1, 5)]
    batch = Collate(pad_id=0)([{"input_ids": s} for s in seqs])
    assert batch["lengths"].tolist() == [7, 3, 7, 1, 5] == batch["attention_mask"].sum(1).tolist()
    ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["lengths"]
    with torch.no_grad():
        out = enc(ids, mask, lengths)
        assert torch.equal(out, enc(ids, mask))
        same = Collate(pad_id=0)([{"input_ids": s[:1]} for s in seqs])  # nothing padded: BERT gets no mask
        assert torch.equal(enc(same["input_ids"], same["attention_mask"], same["lengths"]),
                           enc(same["input_ids"], same["attention_mask"]))
        hidden = enc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
        ref, _ = pad_packed_sequence(enc.lstm(packed)[0], batch_first=True)
    assert torch.allclose(out, (ref[..., :enc.dim] + ref[..., enc.dim:]) / 2, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="CPU"):
        enc(ids.to(META), mask.to(META), lengths.to(META))
    with pytest.raises(ValueError, match="match"):
        enc(ids, mask, lengths[:3])
