"""Reconstruction losses of pixels (L1 + MSE + log-MSE + MS-SSIM); those of waves are in
app/tokenizers/wave_losses.py, which the audio codec's encode-time search shares."""

from __future__ import annotations

import torch
from pytorch_msssim import ms_ssim
from torch import nn
from torch.nn import functional as F

from app.tokenizers.wave_losses import weighted_sum

# log-MSE floor: 1e-5 on [-1, 1] pixels is 56 dB, beyond which a crop's error no longer counts.
_MSE_FLOOR = 1e-5


class ImageLoss(nn.Module):
    """Weighted L1 + MSE + log-MSE + (1 - MS-SSIM) of pixels [B, 3, H, W] in [-1, 1].

    ``log_mse`` is the mean over images of log10(MSE): minus their mean PSNR / 10, the figure
    the evaluation reports. Plain MSE lets detailed crops (large errors) set the gradient; the
    log weighs each crop by 1 / its MSE, so smooth images, where decibels are cheap, count as much.
    """

    def __init__(
        self, l1: float = 1.0, mse: float = 1.0, msssim: float = 0.2, log_mse: float = 0.0
    ) -> None:
        super().__init__()
        self.weights = {"l1": l1, "mse": mse, "msssim": msssim, "log_mse": log_mse}

    def forward(
        self, recon: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        recon = recon.float()
        parts = {"l1": F.l1_loss(recon, target), "mse": F.mse_loss(recon, target)}
        if self.weights["log_mse"]:
            per_image = (recon - target).pow(2).flatten(1).mean(dim=1)
            parts["log_mse"] = torch.log10(per_image + _MSE_FLOOR).mean()
        if self.weights["msssim"]:
            # Window 7 lets 5 scales fit 128-pixel crops (pytorch-msssim: side > 16 * (win - 1)).
            score = ms_ssim(
                (recon.clamp(-1, 1) + 1) / 2, (target + 1) / 2, data_range=1.0, win_size=7
            )
            parts["msssim"] = 1 - score
        return weighted_sum(parts, self.weights), {k: float(v.detach()) for k, v in parts.items()}
