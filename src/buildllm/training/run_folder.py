"""The run folder: atomic checkpoints with checksums, the metrics log, the loss plot, RNG state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from buildllm.errors import UserError
from buildllm.files import atomic_write, current_umask
from buildllm.training.config import (
    RESUMABLE_KEYS,
    RUN_CONFIG,
    saved_config,
)
from buildllm.training.runtime import Dist, barrier
from buildllm.weights.checkpoint import CONFIG, TOKENIZER, WEIGHTS

METRICS, PLOT, STATE, MANIFEST = "metrics.jsonl", "loss.png", "state.pt", "manifest.json"


CHECKPOINTS, BEST = "checkpoints", "best"


STATE_KEYS = ("step", "tokens_seen", "best_score", "best_step", "scheduler", "optimizer", "scaler", "data", "rng")


# What a run writes into its folder (fine-tuning adds its own files: the task's model folder).
RUN_FILES = (RUN_CONFIG, METRICS, PLOT, WEIGHTS, CONFIG, TOKENIZER, CHECKPOINTS, BEST)


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints of a run, oldest first (unfinished ones are hidden .tmp folders)."""
    found = []
    for p in (run / CHECKPOINTS).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(run: Path, step: int, save_model: Callable[[Path], None], state: dict, keep_last: int) -> Path:
    """Write checkpoints/step-N atomically: into a temporary folder, every file fsynced, then renamed.

    ``save_model(folder)`` writes the model's files (the task decides which); the training state
    goes next to them in state.pt.

    A crash at any moment leaves either the complete new checkpoint or none, and the older ones
    are deleted only after the new one is in place.
    """
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a checkpoint is not
    try:
        save_model(tmp)
        atomic_write(tmp / STATE, lambda p: torch.save(state, p))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
        atomic_write(tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2) + "\n"))
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a resumed run's last step): swap it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_dirs(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and training state of a checkpoint folder, every file checked against its sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = f"checkpoint {path}"
    hint = ("move it aside to resume from the previous one, or start over with --force")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{what} has no readable {MANIFEST} ({e}): it is damaged; {hint}") from None
    for name, digest in listed.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"{what} is incomplete: {name} is missing; {hint}")
        if _sha256(file) != digest:
            raise UserError(f"{what} is corrupt or truncated: {name} does not match its sha256; {hint}")
    try:
        weights = load_file(path / WEIGHTS)
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{what} cannot be read ({str(e).splitlines()[0]}); {hint}") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{what} holds no {missing[0]!r} in {STATE}: another version of buildllm wrote "
                        "it; resume with that version, or start over with --force")
    return weights, state


def rng_state() -> dict:
    """Every random number generator that training draws from (dropout, and any user code)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by a crash
            records.append(json.loads(line))
    return records


def plot_losses(records: list[dict], path: Path) -> None:
    """Training and validation loss against steps, with tokens seen on a second axis (the book's plot)."""
    # A bare Figure, not pyplot: no global backend to switch (a notebook keeps drawing inline).
    from matplotlib.figure import Figure

    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not steps and not evals:
        return
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if steps:
        ax.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], color="tab:blue",
                alpha=0.3, linewidth=0.8, label="training loss (each step)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:blue",
                markersize=3, label="training loss")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", color="tab:orange",
                markersize=3, label="validation loss")
    ax.set_xlabel("steps")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(loc="upper right")
    last = (steps or evals)[-1]
    if last["step"] > 0:
        tokens_per_step = last["tokens_seen"] / last["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def check_run_folder(cfg) -> Path | None:
    """Check the out folder against resume/force (touching nothing); the checkpoint to resume, if any.

    ``cfg`` is any config with ``out``, ``resume`` and ``force`` (a TrainConfig, a fine-tuning config).
    """
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise UserError(f"out {run} exists and is not a folder: choose another --out")
    has_run = (run / RUN_CONFIG).is_file()
    if has_run and cfg.resume:
        found = checkpoint_dirs(run)
        if found:
            saved = saved_config(run, type(cfg))
            diff = [k for k in type(cfg).keys()
                    if k not in RESUMABLE_KEYS and getattr(saved, k) != getattr(cfg, k)]
            if diff:
                shown = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
                raise UserError(f"cannot resume {run} with a different configuration ({shown}): "
                                "resume with the same settings, or start over with --force")
            return found[-1][1]
        if cfg.resume is True:
            raise UserError(f"{run} holds no checkpoint yet: nothing to resume; start over with --force")
    elif has_run and not cfg.force and not cfg.resume:
        raise UserError(f"{run} already holds a training run: pass --resume to continue it, --force "
                        "to start over, or choose another --out")
    elif cfg.resume is True:
        raise UserError(f"{run} holds no training run to resume: drop --resume, or check --out")
    elif run.exists() and any(run.iterdir()) and not has_run and not cfg.force:
        raise UserError(f"out folder {run} is not empty and holds no training run: choose another "
                        "--out (or --force to write into it)")
    return None


def start_run_folder(run: Path, dist: Dist, task_files: tuple[str, ...] = ()) -> None:
    """A new run: remove what an earlier run wrote there (with --force), nothing else."""
    if dist.main:
        for name in (*RUN_FILES, *task_files):
            p = run / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        run.mkdir(parents=True, exist_ok=True)
    barrier(dist)


def last_checkpoint(run: Path) -> Path | None:
    found = checkpoint_dirs(run)
    return found[-1][1] if found else None
