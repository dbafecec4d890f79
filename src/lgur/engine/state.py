"""Run folders, checkpoints and exact resume.

A run folder holds:

    config.yaml          the resolved config the run was started with
    last.safetensors     model weights (lgur.checkpoint model file) written every epoch / every N steps
    last.state.pt        optimizer, scheduler, RNG states, epoch/step, best-so-far (torch file)
    best.safetensors     weights of the selected epoch (+ best.state.pt, the same kind of state)
    train.log  metrics.csv  tb/  curves.png  results.json

The state file holds only tensors and plain Python types, so it loads with torch.load(weights_only=True).
Every RNG the run draws from is saved — torch (CPU and CUDA), numpy, Python `random`, the loss's negative
sampler, the device augmentation — together with the position in the epoch, so a resumed run continues
exactly where the interrupted one stopped.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lgur.checkpoint import atomic_write, read_metadata, save_model
from lgur.errors import ConfigError, WeightsError
from lgur.files import read_torch

STATE_SUFFIX = ".state.pt"


def seed_everything(seed: int) -> None:
    """torch (all devices), Python `random` and NumPy (the official code seeds only torch and random)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng() -> dict:
    """Global RNG states as tensors / plain types (torch.load(weights_only=True) can read them back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, tag: str, model: torch.nn.Module, cfg, num_classes: int, state: dict) -> Path:
    """Write `<tag>.safetensors` (weights) and `<tag>.state.pt` (training state), each atomically.

    The weights go first: a crash between the two leaves the previous state file, whose `fingerprint`
    no longer matches, and resume refuses the pair instead of mixing two points in time."""
    weights = run_dir / f"{tag}.safetensors"
    state = {**state, "fingerprint": save_model(model, cfg, weights, num_classes,
                                                extra={"epoch": state["epoch"], "step": state["step"]})}
    atomic_write(run_dir / f"{tag}{STATE_SUFFIX}", lambda tmp: torch.save(state, tmp))
    return weights


# what a state file written by Trainer.state() + save_checkpoint holds at its top level
STATE_KEYS = ("epoch", "step_in_epoch", "step", "optimizer", "scheduler", "scaler", "criterion", "rng", "augment",
              "best", "history", "fingerprint")


def load_state(run_dir: Path, tag: str = "last") -> tuple[dict, Path]:
    """The training state and the path of its weights; refuses a corrupt state file and a pair from two
    different saves with a readable error."""
    state_path, weights = run_dir / f"{tag}{STATE_SUFFIX}", run_dir / f"{tag}.safetensors"
    if not state_path.is_file() or not weights.is_file():
        raise ConfigError(f"{run_dir}: no {tag} checkpoint to resume from ({weights.name} + {state_path.name})")
    state = read_torch(state_path, "lgur training state", WeightsError)  # TorchScript/unknown bytes refused too
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise WeightsError(f"{state_path}: not an lgur training state (lacks {', '.join(missing)}); "
                           "resume from another run or start a new one")
    if read_metadata(weights)["fingerprint"] != state["fingerprint"]:
        raise ConfigError(f"{run_dir}: {weights.name} and {state_path.name} come from different saves "
                          "(interrupted while writing?); resume from another run or delete the pair")
    return state, weights


def find_run(resume: str, output_dir: str | Path) -> Path:
    """`latest` -> the most recently written run folder under output_dir with a `last` checkpoint;
    otherwise the given run folder (or a file inside it)."""
    if resume != "latest":
        path = Path(resume).expanduser()
        run = path.parent if path.is_file() else path
        if not (run / f"last{STATE_SUFFIX}").is_file():
            raise ConfigError(f"--resume {resume}: no last{STATE_SUFFIX} in {run}")
        return run
    candidates = sorted(Path(output_dir).glob(f"*/last{STATE_SUFFIX}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"--resume latest: no run with a checkpoint under {Path(output_dir).resolve()}")
    return candidates[-1].parent
