"""End-to-end training of the tiny model on the synthetic dataset: artifacts, selection, resume, eval CLI."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lgur.checkpoint import load_model
from lgur.cli import main
from lgur.config import load_config
from lgur.engine import trainer as trainer_module
from lgur.engine.trainer import train

METRIC_KEYS = {"R@1", "R@5", "R@10", "mAP", "mINP", "mAP_lgur_trapezoid"}
# 2 epochs of 3 steps, a `last` checkpoint every 2 steps, both retrieval directions
RUN = ["optim.epochs=2", "train.max_steps_per_epoch=3", "train.save_every_steps=2", "train.log_every=2",
       "eval.directions=[t2i,i2t]"]


def _cfg(root, out, *overrides):
    cfg = load_config("lgur_tiny", [*RUN, *overrides])
    cfg.data.root, cfg.output_dir = str(root), str(out)
    return cfg


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = train(_cfg(synth_root, out))
    return results, Path(results["run_dir"])


def test_run_folder_artifacts(tiny_run):
    results, run = tiny_run
    for name in ("config.yaml", "train.log", "metrics.csv", "curves.png", "results.json", "best.safetensors",
                 "last.safetensors", "best.state.pt", "last.state.pt"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml").train.save_every_steps == 2  # the resolved config
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (run / "train.log").read_text()
    assert "pairs/s" in log and "selected on val" in log and "mAP (LGUR trapezoid)" in log

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # lgur_tiny: milestones [1] -> epoch 2 runs at 0.1x; the BiLSTM/projection group starts at 1e-3
    assert [float(r["lr/lr"]) for r in rows] == pytest.approx([1e-3, 1e-4])
    assert [float(r["lr/lr_backbone"]) for r in rows] == pytest.approx([1e-4, 1e-5])
    for key in ("train/loss", "train/rank_dict", "val/t2i/R@1", "val/i2t/mAP", "val/t2i/mAP_lgur_trapezoid"):
        assert all(r[key] for r in rows), key

    assert json.loads((run / "results.json").read_text()) == results
    # selection: the first epoch with the highest val t2i R@1, and best.safetensors holds its weights
    val_r1 = [float(r["val/t2i/R@1"]) for r in rows]
    assert results["selected_on"] == "val" and results["best_epoch"] == val_r1.index(max(val_r1)) + 1
    best_w, last_w = load_file(str(run / "best.safetensors")), load_file(str(run / "last.safetensors"))
    same = all(torch.equal(best_w[k], last_w[k]) for k in last_w)
    assert same == (results["best_epoch"] == 2)  # the last weights are epoch 2's; epoch 1's differ
    best_row = rows[results["best_epoch"] - 1]
    assert float(best_row["val/t2i/R@1"]) == pytest.approx(results["val"]["t2i"]["R@1"])
    assert METRIC_KEYS <= set(results["val"]["t2i"]) and METRIC_KEYS <= set(results["test"]["t2i"])
    assert results["test"]["t2i"]["num_queries"] == 24  # 3 test ids x 4 images x 2 captions

    state = torch.load(run / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (2, 0, 6)
    model, cfg, meta = load_model(run / "best.safetensors")
    assert model.embedding_dim == cfg.model.num_prototypes * cfg.model.embed_dim
    assert meta["extra"]["epoch"] == results["best_epoch"]


def test_resume_mid_epoch_gives_identical_weights(tiny_run, synth_root, tmp_path, monkeypatch):
    """Crash right after the step-4 checkpoint (epoch 2, 1 of 3 steps done), resume: same final weights."""
    reference = load_file(str(tiny_run[1] / "last.safetensors"))
    real_save = trainer_module.save_checkpoint

    def crash_after_step_4(run_dir, tag, model, cfg, num_classes, state):
        real_save(run_dir, tag, model, cfg, num_classes, state)
        if state["step"] == 4:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(trainer_module, "save_checkpoint", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth_root, tmp_path))
    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    (run,) = tmp_path.iterdir()
    state = torch.load(run / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)  # mid-epoch 2 (0-based 1)

    assert main(["train", "--resume", "latest", "--out-dir", str(tmp_path)]) == 0
    resumed = load_file(str(run / "last.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    ref_rows = list(csv.DictReader((tiny_run[1] / "metrics.csv").open()))
    assert [r["val/t2i/mAP"] for r in rows] == [r["val/t2i/mAP"] for r in ref_rows]


def test_eval_cli_same_numbers_and_cross_domain(tiny_run, synth_root, tmp_path, capsys):
    results, run = tiny_run
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--data-root", str(synth_root), "--i2t", "--workers", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mAP (LGUR trapezoid)" in printed and "test t2i" in printed and "test i2t" in printed
    metrics = json.loads(out.read_text())["metrics"]
    for k in METRIC_KEYS:
        assert metrics["t2i"][k] == pytest.approx(results["test"]["t2i"][k], abs=1e-6)

    assert main(["eval", "--checkpoint", str(run / "best.safetensors"), "--data-root", str(synth_root),
                 "--split", "val", "--protocol", "t2i_wm", "--workers", "0", "--out", str(out)]) == 0
    wm = json.loads(out.read_text())["metrics"]["t2i_wm"]
    assert wm["num_queries"] + wm["num_dropped"] == 16  # val: 2 ids x 4 images x 2 captions

    from lgur.data.synth import generate

    other = tmp_path / "other"  # another dataset, other identities: classifier ids play no role
    generate(other, num_ids=10, seed=7, images_per_id=2, workers=1, progress=False)
    assert main(["eval", "--checkpoint", str(run), "--data-root", str(other), "--workers", "0"]) == 0
    assert "test t2i" in capsys.readouterr().out


def _without_val(synth_root, dst):
    """A copy of the synthetic dataset whose val records are moved to train (like ICFG-PEDES: no val)."""
    records = json.loads((synth_root / "reid_raw.json").read_text())
    for r in records:
        if r["split"] == "val":
            r["split"] = "train"
    dst.mkdir()
    (dst / "reid_raw.json").write_text(json.dumps(records))
    (dst / "imgs").symlink_to(synth_root / "imgs")
    return dst


def test_no_val_split_refuses_val_selection_then_selects_on_test(synth_root, tmp_path, capsys):
    root = _without_val(synth_root, tmp_path / "noval")
    args = ["train", "--config", "lgur_tiny", "--data-root", str(root), "--out-dir", str(tmp_path / "runs"),
            "optim.epochs=1", "train.max_steps_per_epoch=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no val split" in err and "eval.select_on=test" in err
    assert not any((tmp_path / "runs").glob("*/last.state.pt"))  # refused before training

    assert main(args + ["eval.select_on=test"]) == 0
    (run,) = (tmp_path / "runs").glob("*/results.json")
    results = json.loads(run.read_text())
    assert results["selected_on"] == "test" and results["val"] is None and results["best_epoch"] == 1
    assert "selected on test" in (run.parent / "train.log").read_text()
    shutil.rmtree(tmp_path / "runs")


def test_bert_runs_only_on_the_real_tokens():
    """A batch padded to 30 positions whose longest caption has 12 tokens: BERT sees 12 positions."""
    from lgur.engine.optim import build_optimizer
    from lgur.engine.trainer import TrainStep
    from lgur.losses import build_criterion
    from lgur.models import build_model

    cfg = load_config("lgur_tiny")
    model = build_model(cfg, 4, pretrained=False)
    seen = []
    model.text.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    mask = (torch.arange(30) < torch.tensor([12, 5, 9, 7])[:, None]).long()
    ids = torch.randint(1000, 5000, (4, 30)) * mask
    step = TrainStep(model, model, build_criterion(cfg), build_optimizer(model, cfg.optim), torch.device("cpu"))
    step(torch.randn(4, 3, *cfg.data.image_size), ids, mask, torch.arange(4))
    assert seen == [(4, 12)]


def test_amp_modes_and_a_bf16_step(monkeypatch):
    from lgur.engine.optim import build_optimizer
    from lgur.engine.precision import resolve_amp
    from lgur.engine.trainer import TrainStep
    from lgur.errors import ConfigError
    from lgur.losses import build_criterion
    from lgur.models import build_model

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # auto follows the hardware's bf16 capability (both answers checked on any machine by faking it)
    for native, expected in ((True, torch.bfloat16), (False, None)):
        with monkeypatch.context() as m:
            m.setattr("lgur.runtime.cpu_has_fast_bf16", lambda: native)
            m.setattr("lgur.engine.precision.cpu_has_fast_bf16", lambda: native, raising=False)
            assert resolve_amp("auto", cpu) is expected
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):  # a GPU without bf16: fp16
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
            assert resolve_amp("auto", cuda) is expected
            assert resolve_amp("fp16", cuda) is torch.float16
    assert resolve_amp(False, cpu) is None  # YAML reads `off` as False
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16"):
        resolve_amp("fp16", cpu)
    cfg = load_config("lgur_tiny", ["model.text_dropout_in_train=false"])
    batch = (torch.randn(4, 3, *cfg.data.image_size), torch.randint(1000, 5000, (4, 9)),
             torch.ones(4, 9, dtype=torch.long), torch.arange(4))
    losses = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model(cfg, 4, pretrained=False)
        step = TrainStep(model, model, build_criterion(cfg), build_optimizer(model, cfg.optim), cpu, dtype)
        losses.append(float(step(*batch)["loss"]))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)  # same loss up to bf16 rounding


def _folder_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a refused resume after a training run: ~14 s in make test-fast, 2 shared cores (load 6-9)
def test_failed_resume_leaves_the_run_folder_as_it_was(tiny_run, tmp_path, capsys):
    """A resume whose override the checkpoint does not fit, or whose state file is corrupt, is a readable
    error (exit 2) and changes no byte of the run folder; a plain --resume still works afterwards."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run)
    before = _folder_bytes(run)

    assert main(["train", "--resume", str(run), "model.dim=32"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "does not fit" in err and "Traceback" not in err
    assert _folder_bytes(run) == before

    state = run / "last.state.pt"
    good = state.read_bytes()
    for broken in (good[: len(good) // 2], b"not a torch file", b""):
        state.write_bytes(broken)
        before = _folder_bytes(run)
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert "last.state.pt" in err and "training state" in err and "Traceback" not in err
        assert _folder_bytes(run) == before

    torch.save({"epoch": 2}, state)  # readable, but not a training state
    assert main(["train", "--resume", str(run)]) == 2
    assert "not an lgur training state" in capsys.readouterr().err

    state.write_bytes(good)
    weights = run / "last.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 1000])  # header intact (same fingerprint), tensors cut short
    before = _folder_bytes(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "last.safetensors" in err and "Traceback" not in err
    assert _folder_bytes(run) == before
    weights.write_bytes(whole)

    assert main(["train", "--resume", str(run), "optim.epochs=3", "train.max_steps_per_epoch=1"]) == 0
    assert load_config(run / "config.yaml").optim.epochs == 3  # a successful resume keeps its overrides
    log = (run / "train.log").read_text()
    assert "optim.epochs: 2 -> 3" in log and "resumed at epoch 3" in log
    assert torch.load(run / "last.state.pt", weights_only=True)["epoch"] == 3


def _troubled(synth_root: Path, dst: Path) -> dict[str, int]:
    """A copy of the synthetic set with 4 train ids, one missing and one undecodable train image, one
    undecodable test image and a test record that reuses a train image (leakage). Returns their records."""
    shutil.copytree(synth_root, dst)
    records = json.loads((dst / "reid_raw.json").read_text())
    train_ids = sorted({r["id"] for r in records if r["split"] == "train"})[:4]
    records = [r for r in records if r["split"] != "train" or r["id"] in train_ids]
    train = [i for i, r in enumerate(records) if r["split"] == "train"]
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    where = {"missing": train[0], "broken_train": train[5], "broken_test": test[1], "leak": len(records)}
    (dst / "imgs" / records[where["missing"]]["file_path"]).unlink()
    for k in ("broken_train", "broken_test"):
        (dst / "imgs" / records[where[k]]["file_path"]).write_bytes(b"\xff\xd8 not a jpeg")
    records.append({**records[test[0]], "file_path": records[train[3]]["file_path"]})
    (dst / "reid_raw.json").write_text(json.dumps(records))
    return where


@pytest.mark.slow  # a training run over damaged data: ~28 s in make test-fast, 2 shared cores (load 6-9)
def test_every_skipped_or_substituted_record_is_named_in_log_and_results(synth_root, tmp_path, capsys):
    """16 train records - 1 missing = 30 pairs = 5 full batches of 6, so every pair is loaded, through 2
    DataLoader workers; the run names each problem record in train.log, results.json and `lgur eval`."""
    root = tmp_path / "data"
    where = _troubled(synth_root, root)
    args = ["train", "--config", "lgur_tiny", "--data-root", str(root), "--out-dir", str(tmp_path / "runs"),
            "optim.epochs=1", "optim.batch_size=6", "data.max_bad_fraction=0.2", "data.num_workers=2",
            "data.persistent_workers=true", "eval.select_on=test"]
    assert main(args) == 2  # the leak is refused before a run folder exists
    err = capsys.readouterr().err
    assert "1 image_in_two_splits" in err and "data.allow_duplicate_images=true" in err
    assert not (tmp_path / "runs").exists()

    assert main(args + ["data.allow_duplicate_images=true"]) == 0
    printed = capsys.readouterr().out  # the closing summary
    assert "data: reid_raw.json: 37 records" in printed and "1 records skipped, 2 substituted" in printed
    (run,) = (tmp_path / "runs").iterdir()
    data = json.loads((run / "results.json").read_text())["data"]
    named = {(p["kind"], p["action"], p["record"]) for p in data["problems"]}
    assert {("missing_image", "skipped", where["missing"]), ("decode_failure", "substituted", where["broken_train"]),
            ("decode_failure", "substituted", where["broken_test"]), ("image_in_two_splits", "note", where["leak"])
            } <= named
    assert data["in"] == {"records": 37, "images": 36, "captions": 74}  # 16 train + 8 val + 12 test + the leak
    assert data["used"]["splits"]["train"] == {"records": 15, "images": 15, "captions": 30}
    assert data["records_skipped"] == 1 and data["records_substituted"] == 2
    log = (run / "train.log").read_text()
    for k in ("missing", "broken_train", "broken_test", "leak"):
        assert f"reid_raw.json record #{where[k]}:" in log, k
    assert "37 records, 36 images, 74 captions in; used 36 records, 35 images, 72 captions" in log
    assert "while loading: 2 decode_failure substituted" in log  # the end-of-run summary

    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--data-root", str(root), "--workers", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"reid_raw.json record #{where['broken_test']}:" in printed and "blank image" in printed
    data = json.loads(out.read_text())["data"]
    assert ("decode_failure", "substituted", where["broken_test"]) in {
        (p["kind"], p["action"], p["record"]) for p in data["problems"]}
    assert data["used"]["splits"] == {"test": {"records": 13, "images": 13, "captions": 26}}


def test_resume_refuses_bit_rotted_weights(tiny_run, tmp_path, capsys):
    """last.safetensors with one flipped bit (its metadata intact, so the state file still pairs with it):
    refused as corrupt before anything trains, the run folder unchanged."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run)
    raw = bytearray((run / "last.safetensors").read_bytes())
    raw[-5] ^= 0x01
    (run / "last.safetensors").write_bytes(bytes(raw))
    before = _folder_bytes(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "last.safetensors" in err and "corrupt model file" in err and "Traceback" not in err
    assert _folder_bytes(run) == before
