"""The training loop: AdamW + warmup/cosine, EMA weights, checkpoints that also export the model.

A checkpoint (runs/<name>/checkpoint.pt) holds everything needed to resume exactly: weights,
EMA weights, optimizer, step, quantizer statistics and random states. Each one also exports the
EMA weights to the model folder, so the best-so-far model can be served or committed anytime.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from app.compute import cpu_runs_bfloat16
from app.model_folder import CONFIG_FILE, native_weights
from app.train.config import TrainConfig
from app.train.ema import WeightEMA
from app.train.export import export_model
from app.train.tasks import Task, build_task

CHECKPOINT_FILE = "checkpoint.pt"
BUDGET_WARMUP_STEPS = 10  # steps a --minutes run leaves untimed (CUDA and cuDNN warm up)
BUDGET_PROBE_STEPS = 50  # steps then timed before a --minutes run first fits its cosine length


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pick_device(requested: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def freeze_parts(model: nn.Module, names: list[str]) -> None:
    """Stop gradients to the named child modules (e.g. ``encoder``) so they stay as they are."""
    parts = dict(model.named_children())
    for name in names:
        if name not in parts:
            raise ValueError(f"cannot freeze {name!r}: the model's parts are {sorted(parts)}")
        parts[name].requires_grad_(False)


class Trainer:
    """Trains one task; ``run()`` goes until ``config.steps``, checkpointing every few minutes."""

    def __init__(
        self,
        config: TrainConfig,
        data_dir: Path,
        out: Path,
        run_dir: Path,
        device: torch.device | None = None,
        minutes: float | None = None,
    ) -> None:
        self.config = config
        self.minutes = minutes
        self.out = out
        self.run_dir = run_dir
        self.device = device or pick_device("auto")
        torch.backends.cudnn.benchmark = True  # fixed crop/segment shapes: pick the fastest kernels
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.task: Task = build_task(config, data_dir, self.rng)
        self.task.to(self.device)
        self.model = self.task.model
        freeze_parts(self.model, config.freeze)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
        )
        self.ema = WeightEMA(self.model, config.ema_decay)
        self.step = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    def set_lr(self) -> float:
        """Learning rate of the current step, written into the optimizer."""
        cfg = self.config
        lr = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CUDA and on a CPU that computes in bf16 (``cpu_runs_bfloat16``);
        full precision on other CPUs, which would only emulate it."""
        if self.device.type == "cuda" or cpu_runs_bfloat16():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, dict[str, float], float]:
        """One optimizer step -> (loss, loss parts, items in the batch)."""
        self.model.train()
        batch = self.task.sampler.batch(self.config.batch_size).to(self.device, non_blocking=True)
        self.set_lr()
        with self.autocast():
            loss, parts = self.task.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {self.step}: {parts}")
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return float(loss.detach()), parts, self.task.items(batch)

    def save(self) -> None:
        """Write the checkpoint (atomically) and export the EMA weights to the model folder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "task": self.task.state_dict(),
            "rng": {"python": self.rng.getstate(), "torch": torch.get_rng_state()},
            "config": self.config.to_dict(),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)
        export_model(self.ema.model, self.config, self.out)

    def resume(self) -> None:
        """Restore everything from the run folder's checkpoint."""
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state["task"])
        python_state = state["rng"]["python"]
        self.rng.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.step = int(state["step"])

    def warm_start(self, model_dir: Path) -> None:
        """Start from a model folder's weights (its own or its ``source``'s), as weights and EMA,
        at step 0. A part of the model that the folder has no weights for at all (a feedback
        encoder added to a trained tokenizer) keeps its initialization; any other mismatch is
        an error."""
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        weights = load_file(str(native_weights(model_dir, config)), device=str(self.device))
        own = self.model.state_dict()
        new_parts = {key.split(".")[0] for key in own} - {key.split(".")[0] for key in weights}
        weights.update({k: v for k, v in own.items() if k.split(".")[0] in new_parts})
        self.model.load_state_dict(weights)
        self.ema.model.load_state_dict(weights)
        self.task.warm_started()

    def fit_steps_to_budget(self, steps_timed: int, timed_s: float, elapsed_s: float) -> None:
        """Set the cosine length so that training ends ``minutes`` after it started.

        ``steps_timed`` steps (counted from just after the warm-up ones) took ``timed_s``: a fixed
        device lease (a GPU borrowed for ten minutes) then still ends on an annealed model.
        """
        assert self.minutes is not None
        rate = steps_timed / max(timed_s, 1e-9)
        remaining = max(0.0, self.minutes * 60 - elapsed_s)
        self.config.steps = self.step + int(rate * remaining)

    def run(self) -> None:
        """Train until ``config.steps``; checkpoint every ``checkpoint_minutes`` and at the end.

        With ``minutes`` set, ``config.steps`` is fitted from the measured step rate after
        ``BUDGET_PROBE_STEPS`` steps and refitted at every log line, the rate then timed over
        all steps since the warm-up, so the run ends on time (see ``fit_steps_to_budget``).
        """
        cfg = self.config
        started, first_step = time.monotonic(), self.step
        probe_start, probe_step = started, self.step
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc=cfg.name, mininterval=5.0, dynamic_ncols=True
        )
        last_save = time.monotonic()
        smoothed: float | None = None
        window_items, window_start = 0.0, time.monotonic()
        while self.step < cfg.steps:
            loss, parts, items = self.train_step()
            if self.minutes is not None:
                done = self.step - first_step
                if done == BUDGET_WARMUP_STEPS:
                    probe_start, probe_step = time.monotonic(), self.step
                probed = done - BUDGET_WARMUP_STEPS - BUDGET_PROBE_STEPS
                if probed == 0 or (probed > 0 and self.step % cfg.log_every == 0):
                    now = time.monotonic()
                    self.fit_steps_to_budget(
                        self.step - probe_step, now - probe_start, now - started
                    )
                    bar.total = cfg.steps
            smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
            window_items += items
            bar.update(1)
            if self.step % cfg.log_every == 0:
                rate = window_items / max(1e-9, time.monotonic() - window_start)
                window_items, window_start = 0.0, time.monotonic()
                bar.set_postfix(
                    loss=f"{smoothed:.4f}",
                    **{k: f"{v:.4f}" for k, v in parts.items()},
                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                    rate=f"{rate:.2f}{self.task.unit}/s",
                )
            if time.monotonic() - last_save >= cfg.checkpoint_minutes * 60:
                self.save()
                last_save = time.monotonic()
                bar.write(f"step {self.step}: loss {smoothed:.4f}, saved {self.checkpoint_path}")
        self.save()
        bar.close()
