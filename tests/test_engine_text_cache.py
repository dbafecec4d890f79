"""train.cache_text: the frozen text backbone run once per caption gives the same loss and gradients as
running it every step, BERT no longer runs in the train step, and it is refused where dropout is active."""
from __future__ import annotations

import pytest
import torch

from lgur.config import load_config
from lgur.data.datasets import Collate, TokenizedCaptions
from lgur.engine.text_cache import TextHiddenCache
from lgur.errors import ConfigError
from lgur.losses import build_criterion
from lgur.models import build_model

CAPTIONS = ["A man in a red jacket and blue jeans.", "A woman wearing a long white coat, carrying a black bag.",
            "A man in a red jacket and blue jeans.",  # the same caption again: one cache entry
            "The girl has long hair.", "A person in a green hoodie and black shorts walking down the street."]


def _setup(*overrides):
    cfg = load_config("lgur_tiny", ["model.text_dropout_in_train=false", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, 4, pretrained=False).train()
    tokens = TokenizedCaptions(CAPTIONS, model.tokenizer, cfg.data.max_caption_tokens)
    return cfg, model, tokens


def _loss_and_grads(model, cfg, batch, images, labels, hidden):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    criterion = build_criterion(cfg)  # its own negative-sampling generator: the same draws for both paths
    extra = {} if hidden is None else {"text_hidden": hidden}
    outputs = model(images, batch["input_ids"], batch["attention_mask"], **extra)
    loss, _ = criterion(outputs, labels, model)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_text_path_gives_the_same_loss_and_gradients():
    cfg, model, tokens = _setup()
    cache = TextHiddenCache(model.text, tokens, torch.device("cpu"), progress=False)
    assert len(cache) == 5 and cache.flat.shape[0] == sum(len(tokens[i]) for i in (0, 1, 3, 4))  # deduplicated
    assert int(cache.row_of[0]) == int(cache.row_of[2])

    indices = torch.tensor([4, 0, 3, 2, 1])
    batch = Collate(model.tokenizer.pad_token_id)([{"input_ids": tokens[int(i)]} for i in indices])
    hidden = cache.lookup(indices)
    assert hidden.shape[:2] == batch["input_ids"].shape
    assert (hidden[batch["attention_mask"] == 0] == 0).all()  # padded steps are 0, as the collate pads

    calls = []
    model.text.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    images = torch.randn(5, 3, *cfg.data.image_size)
    labels = torch.tensor([0, 1, 2, 1, 3])
    loss_ref, grads_ref = _loss_and_grads(model, cfg, batch, images, labels, None)
    assert len(calls) == 1
    loss_c, grads_c = _loss_and_grads(model, cfg, batch, images, labels, hidden)
    assert len(calls) == 1  # the cached step never runs the text backbone

    assert loss_c == pytest.approx(loss_ref, rel=1e-5)
    assert grads_c.keys() == grads_ref.keys() and any(n.startswith("text.lstm") for n in grads_c)
    for name, g in grads_ref.items():  # equal up to the float summation order of BERT's matmuls
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_cache_is_refused_when_the_frozen_backbone_has_dropout_in_training():
    cfg, model, tokens = _setup("model.text_dropout_in_train=true")
    with pytest.raises(ConfigError, match="text_dropout_in_train"):
        TextHiddenCache(model.text, tokens, torch.device("cpu"), progress=False)
    cfg, model, tokens = _setup("model.freeze_text=false")
    with pytest.raises(ConfigError, match="freeze_text"):
        TextHiddenCache(model.text, tokens, torch.device("cpu"), progress=False)


@pytest.mark.slow  # two training runs: ~15 s in make test-fast, 2 shared cores (load 6-9)
def test_training_with_the_cache_matches_training_without(synth_root, tmp_path):
    """Two epochs of 3 steps through `lgur train`'s engine, with and without the cache: same losses and
    the same trained weights up to float rounding; the config check comes before any run folder."""
    from safetensors.torch import load_file

    from lgur.engine.trainer import train

    runs = {}
    for cached in (False, True):
        cfg = load_config("lgur_tiny", ["optim.epochs=2", "train.max_steps_per_epoch=3", "eval.select_on=test",
                                        "model.text_dropout_in_train=false", f"train.cache_text={cached}"])
        cfg.data.root, cfg.output_dir = str(synth_root), str(tmp_path / f"cached{cached}")
        runs[cached] = train(cfg)
    assert "train.cache_text: " in (tmp_path / "cachedTrue").joinpath(
        next((tmp_path / "cachedTrue").iterdir()).name, "train.log").read_text()
    a, b = (load_file(str(tmp_path / f"cached{c}" / r["run_dir"].split("/")[-1] / "last.safetensors"))
            for c, r in runs.items())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=name)

    cfg = load_config("lgur_tiny", ["train.cache_text=true"])  # the official quirk: dropout on in BERT
    cfg.data.root, cfg.output_dir = str(synth_root), str(tmp_path / "refused")
    with pytest.raises(ConfigError, match="text_dropout_in_train=false"):
        train(cfg)
    assert not (tmp_path / "refused").exists()
