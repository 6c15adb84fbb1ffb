"""Run each model once before readiness, so the first request pays no lazy initialisation."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from app.runner import AudioRunner
from app.services import Services

log = logging.getLogger("tokserve.warmup")


def warm_up(services: Services) -> None:
    """One encode and one decode per model, on inputs of the model's own shapes."""
    for name, runner in services.runners.items():
        start = time.perf_counter()
        info = runner.model.info
        if isinstance(runner, AudioRunner):
            rate = info.sample_rate or 16000
            wave = torch.zeros(info.channels or 1, rate)
            tokens = runner.encode_batch([wave])[0]
        else:
            height, width = info.image_size or (256, 256)
            tokens = runner.encode_batch([torch.zeros(3, height, width)])[0]
        runner.decode_batch([np.asarray(tokens)])
        log.info("warmed up %s in %.0f ms", name, 1000 * (time.perf_counter() - start))
