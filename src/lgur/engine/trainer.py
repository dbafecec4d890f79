"""Training: `train(cfg)` builds everything, runs the epochs, evaluates, selects, checkpoints, reports.

The loop itself is `Trainer.train_epoch` (one screen); the rest are helpers around it:

    TrainStep    one optimisation step (autocast, optional cross-rank embedding gather, backward, step)

The train loader comes from lgur.data.build_loaders, ready to resume: its sampler gives the epoch's
shuffled order for this rank and starts mid-epoch, and every item's augmentation is seeded from
(seed, epoch, index) (lgur.data.sampling).

Model selection: t2i R@1 on `eval.select_on` (val by default; test is the official protocol and the
only choice for datasets without a val split, e.g. ICFG-PEDES). With val selection the selected
weights are evaluated once on test at the end. results.json and the final table name the split.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from logging.handlers import MemoryHandler
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from lgur.checkpoint import atomic_write, read_model_file
from lgur.config import config_from_dict, save_config
from lgur.data.annotations import load_annotations
from lgur.data.datasets import build_loaders
from lgur.engine.distributed import DistEnv, barrier, gather_labels, gather_with_grad, init_distributed, teardown
from lgur.engine.evaluation import evaluate, flatten
from lgur.engine.monitor import Monitor, setup_logging
from lgur.engine.optim import build_optimizer, build_scheduler
from lgur.engine.precision import autocast, grad_scaler, resolve_amp
from lgur.engine.state import capture_rng, load_state, restore_rng, save_checkpoint, seed_everything
from lgur.engine.text_cache import TextHiddenCache
from lgur.errors import ConfigError
from lgur.eval.table import by_direction, format_table
from lgur.losses import build_criterion
from lgur.models import build_model

log = logging.getLogger("lgur.engine")
SELECT_METRIC = ("t2i", "R@1")


@dataclass
class TrainStep:
    """One optimisation step on a batch; returns the criterion's logged terms as device tensors (no sync).

    With `gather` (DDP + train.gather_embeddings) the branch embeddings and labels of all ranks are
    concatenated before the loss, so ranking negatives and ID terms see the global batch; the loss is
    computed in float32 outside autocast."""

    model: torch.nn.Module          # maybe DDP-wrapped / compiled: what the forward runs
    core: torch.nn.Module           # the plain LGUR (classifiers, encode_*)
    criterion: object
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    gather_world: int = 1           # > 1: gather embeddings across this many ranks
    grad_clip: float | None = None

    def __post_init__(self):
        if self.scaler is None:  # a disabled scaler passes backward/step through unchanged
            self.scaler = grad_scaler(self.device, None)

    def __call__(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor, lengths: torch.Tensor | None = None,
                 text_hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`lengths`: the batch's caption lengths, left on the CPU (the text encoder packs with them
        instead of copying the mask's sums back from the device). `text_hidden`: the frozen text
        backbone's output for these captions (train.cache_text)."""
        with autocast(self.device, self.dtype):
            extra = {} if text_hidden is None else {"text_hidden": text_hidden}
            outputs = self.model(images, input_ids, attention_mask, lengths, **extra)
        outputs = {k: v.float() for k, v in outputs.items()}
        if self.gather_world > 1:
            outputs = {k: gather_with_grad(v) for k, v in outputs.items()}
            labels = gather_labels(labels, self.gather_world)
        loss, logged = self.criterion(outputs, labels, self.core)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logged


@dataclass
class Trainer:
    """Everything one run holds, and the epoch loop."""

    cfg: object
    env: DistEnv
    run_dir: Path | None            # None on ranks > 0
    step_fn: TrainStep
    scheduler: object
    loaders: object
    monitor: Monitor
    num_classes: int
    epoch: int = 0                  # next epoch to run (0-based)
    step_in_epoch: int = 0          # batches of `epoch` already trained (a mid-epoch resume)
    global_step: int = 0
    best: dict = field(default_factory=lambda: {"epoch": None, "score": float("-inf"), "metrics": None})
    history: list = field(default_factory=list)
    augment_state: torch.Tensor | None = None  # DeviceAugment generator state of a mid-epoch resume
    annotations: object = None      # the dataset's Annotations (its report goes into results.json)
    text_cache: object = None       # TextHiddenCache (train.cache_text) or None

    @property
    def core(self) -> torch.nn.Module:
        return self.step_fn.core

    def steps_per_epoch(self) -> int:
        cap = self.cfg.train.max_steps_per_epoch
        n = self.loaders.sampler.num_samples // self.loaders.train.batch_size
        return min(n, int(cap)) if cap else n

    def train_epoch(self) -> dict[str, float]:
        """Train `self.epoch` from `self.step_in_epoch` on; returns the epoch's mean logged terms."""
        tc, dev, prepare = self.cfg.train, self.env.device, self.loaders.prepare
        self.core.train()
        self.loaders.set_epoch(self.epoch)
        if self.augment_state is not None:  # mid-epoch resume: continue the epoch's augmentation stream
            self.loaders.augment.generator(dev).set_state(self.augment_state)
            self.augment_state = None
        self.loaders.sampler.start = self.step_in_epoch * self.loaders.train.batch_size
        total, window, t_window, n_window, first = {}, {}, time.perf_counter(), 0, self.step_in_epoch
        n_steps = self.steps_per_epoch()
        bar = tqdm(total=n_steps, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}",
                   unit="step", disable=not self.env.main, dynamic_ncols=True)
        for batch in self.loaders.train:
            if self.step_in_epoch >= n_steps:
                break
            labels = batch["labels"].to(dev, non_blocking=True)
            hidden = self.text_cache.lookup(batch["indices"]) if self.text_cache is not None else None
            logged = self.step_fn(prepare(batch["images"].to(dev, non_blocking=True), True),
                                  batch["input_ids"].to(dev, non_blocking=True),
                                  batch["attention_mask"].to(dev, non_blocking=True), labels, batch.get("lengths"),
                                  hidden)
            for k, v in logged.items():  # device tensors: no host sync on the hot path
                total[k] = total.get(k, 0.0) + v
                window[k] = window.get(k, 0.0) + v
            self.step_in_epoch, self.global_step, n_window = self.step_in_epoch + 1, self.global_step + 1, n_window + 1
            bar.update()
            if self.global_step % tc.log_every == 0 or self.step_in_epoch == n_steps:
                t_window, n_window = self.log_window(window, n_window, bar, t_window), 0
            if tc.save_every_steps and self.global_step % tc.save_every_steps == 0 and self.step_in_epoch < n_steps:
                self.save("last")
        bar.close()
        return {k: float(v) / max(self.step_in_epoch - first, 1) for k, v in total.items()}

    def log_window(self, window: dict, steps: int, bar, since: float) -> float:
        """The periodic CPU sync: mean terms of the last `steps` steps -> tqdm, train.log, TensorBoard."""
        values = dict(zip(window, torch.stack([torch.as_tensor(v) for v in window.values()]).tolist()))
        now = time.perf_counter()
        pairs = steps * self.loaders.train.batch_size * self.env.world / max(now - since, 1e-9)
        means = {k: v / steps for k, v in values.items()}
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.3f}", pairs_s=f"{pairs:.1f}")
        if self.env.main:
            log.info("epoch %d step %d/%d (global %d): %s | %.1f pairs/s", self.epoch + 1, self.step_in_epoch,
                     self.steps_per_epoch(), self.global_step,
                     " ".join(f"{k}={v:.4f}" for k, v in means.items()), pairs)
            self.monitor.scalars({f"train/{k}": v for k, v in means.items()} | {"train/pairs_per_s": pairs},
                                 self.global_step)
        window.clear()
        return now

    # ---- evaluation, selection, checkpoints
    def select_split(self):
        return self.loaders.val if self.cfg.eval.select_on == "val" else self.loaders.test

    def evaluate(self, split) -> dict[str, dict[str, float]]:
        ec = self.cfg.eval
        directions = tuple(dict.fromkeys(("t2i", *ec.directions)))  # t2i always: it selects the model
        return evaluate(self.core, split, self.env.device, self.step_fn.dtype, self.loaders.prepare,
                        directions, ec.chunk_size, progress=self.env.main)

    def state(self) -> dict:
        s = self.step_fn
        augment = self.loaders.augment
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.global_step,
                "optimizer": s.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": s.scaler.state_dict(),
                "criterion": s.criterion.state_dict(), "rng": capture_rng(),
                "augment": augment.generator(self.env.device).get_state() if augment is not None else None,
                "best": self.best, "history": self.history,
                "decode_failures": {k: v.clone() for k, v in self.loaders.failure_counts().items()}}

    def load(self, state: dict) -> None:
        s = self.step_fn
        s.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty for a disabled (non-fp16) scaler
            s.scaler.load_state_dict(state["scaler"])
        s.criterion.load_state_dict(state["criterion"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["step"]
        self.best, self.history = state["best"], state["history"]
        restore_rng(state["rng"])
        if self.env.rank == 0:  # the counts of the interrupted session (rank 0 holds every rank's, see end_epoch)
            self.loaders.add_failure_counts(state.get("decode_failures") or {})
        if self.env.rank > 0:  # only rank 0's streams were saved: give the others their own again
            torch.manual_seed(hash((self.cfg.seed, self.env.rank, self.global_step)) & (2**63 - 1))
        if self.loaders.augment is not None and self.step_in_epoch and self.env.rank == 0:
            self.augment_state = state["augment"]

    def save(self, tag: str) -> None:
        if self.env.main:
            save_checkpoint(self.run_dir, tag, self.core, self.cfg, self.num_classes, self.state())

    def collect_failure_counts(self) -> None:
        """DDP: sum every rank's training decode-failure counts into rank 0's (the others restart at 0),
        so rank 0's report and checkpoints cover all ranks. Collective: every rank calls it."""
        if not self.env.distributed:
            return
        counts = self.loaders.failure_counts()["train"]
        total = counts.to(self.env.device, torch.int64)
        torch.distributed.reduce(total, dst=0)
        if self.env.rank == 0:
            counts.copy_(total.cpu())
        else:
            counts.zero_()

    def end_epoch(self, train_terms: dict[str, float]) -> None:
        """Schedule step, evaluation + selection (rank 0), CSV/TensorBoard row, checkpoints."""
        ec, epoch = self.cfg.eval, self.epoch
        self.collect_failure_counts()
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.step_fn.optimizer.param_groups}
        self.scheduler.step()
        self.epoch, self.step_in_epoch = epoch + 1, 0
        row = {"epoch": epoch + 1, **{f"train/{k}": v for k, v in train_terms.items()}, **lrs}
        last = self.epoch == self.cfg.optim.epochs
        if self.env.main and ((epoch + 1) % ec.every == 0 or last):
            split = self.select_split()
            metrics = self.evaluate(split)
            row.update(flatten(metrics, split.name))
            score = metrics[SELECT_METRIC[0]][SELECT_METRIC[1]]
            log.info("epoch %d %s:\n%s", epoch + 1, split.name, format_table(by_direction({split.name: metrics})))
            if score > self.best["score"]:
                self.best = {"epoch": epoch + 1, "score": score, "metrics": metrics}
                log.info("epoch %d: new best %s %s %s = %.2f%%", epoch + 1, split.name, *SELECT_METRIC, 100 * score)
                self.save("best")
        self.history.append(row)
        if self.env.main:
            self.monitor.epoch_row(row)
            self.monitor.scalars({k: v for k, v in row.items() if k != "epoch"}, self.global_step)
            if (epoch + 1) % self.cfg.train.save_every == 0 or last:
                self.save("last")
        barrier(self.env)

    def fit(self) -> dict | None:
        """Run the remaining epochs; rank 0 returns the final report (results.json)."""
        while self.epoch < self.cfg.optim.epochs:
            self.end_epoch(self.train_epoch())
        return self.report() if self.env.main else None

    def report(self) -> dict:
        """Best epoch with its selection-split and test metrics -> results.json, table, curves.png."""
        split = self.cfg.eval.select_on
        if split == "val":
            # through the one verified reader (lgur.files): the file may have been damaged since it was written
            self.core.load_state_dict(read_model_file(self.run_dir / "best.safetensors")[0])
            log.info("evaluating the selected weights (epoch %d) on test", self.best["epoch"])
            test = self.evaluate(self.loaders.test)
        else:
            test = self.best["metrics"]
        data = data_report(self.annotations, self.loaders)
        results = {"selected_on": split, "selection_metric": " ".join(SELECT_METRIC), "best_epoch": self.best["epoch"],
                   "epochs": self.cfg.optim.epochs, "val": self.best["metrics"] if split == "val" else None,
                   "test": test, "checkpoint": str(self.run_dir / "best.safetensors"), "run_dir": str(self.run_dir),
                   "data": data}
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        rows = {"val": results["val"], "test": test} if split == "val" else {"test": test}
        log.info("best epoch %d of %d, selected on %s by t2i R@1 (%s):\n%s", results["best_epoch"],
                 results["epochs"], split, "the official protocol" if split == "test" else "test never seen",
                 format_table(by_direction(rows)))
        log_data_report(data, "data used by this run")
        self.monitor.plot()
        return results


def data_report(ann, loaders) -> dict:
    """The annotations' report plus what the loaders skipped, substituted or truncated so far."""
    return ann.report(loaders.problems(ann.annotation_file.name), getattr(loaders.train_set, "left_out", []))


def log_data_report(report: dict, title: str) -> None:
    """The summary line, then every skipped, substituted or excluded record by name (others: examples)."""
    log.info("%s: %s", title, report["summary"])
    if report["problems"]:
        log.warning("data problems (%s):\n%s", ", ".join(f"{k}: {n}" for k, n in report["problem_counts"].items()),
                    report["text"])


def new_run_dir(cfg) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    n = 1
    while run.exists():
        n += 1
        run = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{n}"
    return run


def check_selection(cfg, annotations) -> None:
    """Refuse val selection on a dataset without a val split (ICFG-PEDES) before anything is built."""
    if cfg.eval.select_on not in ("val", "test"):
        raise ConfigError(f"eval.select_on must be val or test, got {cfg.eval.select_on!r}")
    if cfg.eval.select_on == "val" and not annotations.val:
        raise ConfigError(f"{annotations.annotation_file.name} ({annotations.layout}) has no val split, so the model "
                          "cannot be selected on val: pass eval.select_on=test (the official protocol: "
                          "best epoch on the test split, which makes the test numbers optimistic)")


def load_data(cfg):
    """The dataset's annotations, checked (readable, selection split present) before a run folder exists."""
    dc = cfg.data
    if not dc.root:
        raise ConfigError("no dataset: pass --data-root DIR (or data.root=DIR)")
    ann = load_annotations(dc.root, dc.skip_train_ids, dc.max_bad_fraction)
    ann.raise_if_duplicates(bool(dc.allow_duplicate_images))
    check_selection(cfg, ann)
    if cfg.train.cache_text and (not cfg.model.freeze_text or cfg.model.text_dropout_in_train):
        raise ConfigError("train.cache_text reuses the frozen text backbone's output, so it needs "
                          "model.freeze_text=true and model.text_dropout_in_train=false (no dropout in it)")
    return ann


def build_trainer(cfg, env: DistEnv, run_dir: Path | None, ann, resume_state: dict | None = None,
                  resume_weights: Path | None = None) -> Trainer:
    """Model, loaders, loss, optimiser, schedule, AMP, DDP/compile, and the resumed state if any."""
    if env.main:
        log.info("data %s (%s): %s; %d train ids", cfg.data.root, ann.layout, ann.counts(), ann.num_train_ids)
    seed_everything(cfg.seed + env.rank)
    core = build_model(cfg, ann.num_train_ids, pretrained=resume_weights is None)
    if resume_weights is not None:
        state = read_model_file(resume_weights)[0]  # verified: a damaged file is refused as corrupt
        with _resume_errors(resume_weights):
            core.load_state_dict(state)
    core.to(env.device)
    loaders = build_loaders(cfg, ann, core.tokenizer, core.image_mean, core.image_std,
                            distributed=env.distributed, progress=env.main)
    optimizer = build_optimizer(core, cfg.optim)
    dtype = resolve_amp(cfg.train.amp, env.device)
    model = core
    if env.distributed:
        # device_ids=None: DDP would otherwise copy every tensor argument to the GPU, including the
        # caption lengths that must stay on the CPU (the loop moves the other tensors itself)
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=None)
    if cfg.train.compile:
        model = torch.compile(model)
    step = TrainStep(model, core, build_criterion(cfg), optimizer, env.device, dtype, grad_scaler(env.device, dtype),
                     env.world if env.distributed and cfg.train.gather_embeddings else 1, cfg.optim.grad_clip)
    trainer = Trainer(cfg, env, run_dir, step, build_scheduler(optimizer, cfg.optim), loaders, Monitor(None),
                      ann.num_train_ids, annotations=ann)
    if cfg.train.cache_text:
        trainer.text_cache = TextHiddenCache(core.text, loaders.train_set.tokens, env.device, dtype,
                                             cfg.eval.batch_size, progress=env.main)
    if resume_state is not None:
        with _resume_errors(resume_weights):
            trainer.load(resume_state)
    trainer.monitor = Monitor(run_dir if env.main else None)  # only now: it creates tb/ files
    if env.main:
        n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
        log.info("model %s/%s: %.2fM parameters, %.2fM trainable; amp=%s; %d process(es) x batch %d; "
                 "%d steps/epoch", cfg.model.image_backbone, cfg.model.text_backbone,
                 sum(p.numel() for p in core.parameters()) / 1e6, n_train / 1e6, dtype or "off", env.world,
                 loaders.train.batch_size, trainer.steps_per_epoch())
        log_data_report(data_report(ann, loaders), "data")
    return trainer


def train(cfg, resume_dir: Path | None = None) -> dict | None:
    """Train per cfg (a new run folder) or continue the run in resume_dir. Rank 0 returns results.json's
    content. Under torchrun every rank calls this; the process group is joined and left here."""
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, env, resume_dir)
    finally:
        teardown(env)


def _train(cfg, env: DistEnv, resume_dir: Path | None) -> dict | None:
    ann = load_data(cfg)
    if resume_dir is not None:
        return _resume(cfg, env, resume_dir, ann)
    run_dir = new_run_dir(cfg)
    if env.distributed:  # every rank uses rank 0's folder name
        names = [str(run_dir)]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: save_config(cfg, tmp))
    setup_logging(run_dir / "train.log" if env.main else None)
    trainer = build_trainer(cfg, env, run_dir if env.main else None, ann)
    if env.main:
        log.info("run folder %s", run_dir)
    return _fit(trainer)


def _resume(cfg, env: DistEnv, run_dir: Path, ann) -> dict | None:
    """Continue the run in run_dir under cfg (its config.yaml plus any overrides). Nothing in the folder
    changes until the checkpoint has loaded into what cfg builds: a refused resume (corrupt state, an
    override the checkpoint does not fit) leaves config.yaml, train.log and tb/ as they were, so the
    run can still be resumed as it was. The log lines of the build are held in memory until then."""
    setup_logging(None)
    held = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    root = logging.getLogger()
    root.addHandler(held)
    try:
        state, weights = load_state(run_dir)
        trainer = build_trainer(cfg, env, run_dir if env.main else None, ann, state, weights)
    finally:
        root.removeHandler(held)
    if env.main:
        changed = _config_changes(run_dir / "config.yaml", cfg)
        atomic_write(run_dir / "config.yaml", lambda tmp: save_config(cfg, tmp))
        setup_logging(run_dir / "train.log")
        held.setTarget(next(h for h in root.handlers if isinstance(h, logging.FileHandler)))
        held.flush()
        if changed:
            log.info("resumed with a changed config (config.yaml rewritten): %s", "; ".join(changed))
        log.info("run folder %s (resumed at epoch %d, step %d)", run_dir, trainer.epoch + 1, trainer.step_in_epoch)
    else:
        setup_logging(None)
    held.close()
    return _fit(trainer)


def _fit(trainer: Trainer) -> dict | None:
    try:
        return trainer.fit()
    finally:
        trainer.monitor.close()


@contextmanager
def _resume_errors(weights: Path):
    """A checkpoint that does not fit the model/optimizer built from the resolved config (a changed
    model.* override, another dataset's number of ids, a tampered state) -> one readable ConfigError."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"cannot resume {weights.parent}: its checkpoint does not fit the model and optimizer "
                          f"built from the resolved config ({type(e).__name__}: {first}); resume without the "
                          "overrides that change the model or the data; the run folder was left unchanged") from None


def _config_changes(saved: Path, cfg) -> list[str]:
    """'key: old -> new' for every leaf that differs between the saved config.yaml and cfg."""
    try:
        old = config_from_dict(yaml.safe_load(saved.read_text()) or {}).to_dict()
    except Exception:  # noqa: BLE001 - only a log line depends on it
        return ["(the previous config.yaml could not be read)"]

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    before, after = dict(leaves(old)), dict(leaves(cfg.to_dict()))
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in after.keys() | before.keys()
            if before.get(k) != after.get(k)]
