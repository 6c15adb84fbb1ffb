"""transformers audio codecs (EnCodec, DAC, Mimi, X-codec, WavTokenizer) as AudioTokenizers.

Each adapter calls the model's own ``encode``/``decode`` (transformers 5.x signatures) on waves
padded to whole frames; ``FramedAudioCodec`` does the padding and batching. All of them take
mono or stereo float waves [B, C, T] at the model's sample rate and give codes [B, K, F] with
F = T / hop; K is fixed at load time (EnCodec and X-codec by bandwidth, DAC and Mimi by count;
WavTokenizer has one codebook).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from app.tokenizers.adapters import BadOption, FramedAudioCodec, check_options
from app.tokenizers.base import AudioInfo
from app.tokenizers.causal import CausalStepper, is_streamable


def _bandwidth(model: Any, options: dict[str, Any], name: str) -> tuple[float, dict[str, int]]:
    """The ``bandwidth`` option in kbps (default: highest), and the codebooks each one takes."""
    bandwidths = [float(b) for b in model.config.target_bandwidths]
    bandwidth = float(options.get("bandwidth", bandwidths[-1]))
    if bandwidth not in bandwidths:
        raise BadOption(f"{name} encodes at {bandwidths} kbps, not bandwidth={bandwidth}")
    per_bandwidth = {
        str(b): model.quantizer.get_num_quantizers_for_bandwidth(b) for b in bandwidths
    }
    return bandwidth, per_bandwidth


def _codebooks(options: dict[str, Any], low: int, high: int, model: str) -> int:
    """The ``codebooks`` option, low..high; default all of them."""
    count = int(options.get("codebooks", high))
    if not low <= count <= high:
        raise BadOption(f"{model} has {high} codebooks; codebooks={count} must be {low} to {high}")
    return count


def _audio_info(
    config: Any,
    sample_rate: int,
    channels: int,
    hop: int,
    codebooks: int,
    causal: bool = False,
    streaming: bool = False,
    **extra: Any,
) -> AudioInfo:
    return AudioInfo(
        vocab_size=int(config.codebook_size),
        codebooks=codebooks,
        sample_rate=int(sample_rate),
        channels=channels,
        hop_length=hop,
        frame_rate=sample_rate / hop,
        causal=causal,
        streaming=streaming,
        extra=extra,
    )


class EncodecCodec(FramedAudioCodec):
    """EncodecModel: causal SEANet + RVQ; K = bandwidth * 1000 / (frame_rate * log2(vocab))."""

    OPTIONS = ("bandwidth",)

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        config = model.config
        check_options(options, self.OPTIONS, "EncodecModel")
        if config.chunk_length_s is not None or config.normalize:
            raise BadOption(
                "this EnCodec checkpoint encodes chunks with a volume scale each (like the 48 kHz "
                "model); the scales are not tokens, so it cannot serve as a tokenizer (the 24 kHz "
                "model can)"
            )
        self.bandwidth, per_bandwidth = _bandwidth(model, options, "EncodecModel")
        self.model = model
        self.device = device
        self.padding_safe = bool(config.use_causal_conv)
        self.info = _audio_info(
            config,
            config.sampling_rate,
            int(config.audio_channels),
            int(config.hop_length),
            per_bandwidth[str(self.bandwidth)],
            causal=self.padding_safe,
            streaming=is_streamable(model),
            bandwidth_kbps=self.bandwidth,
            codebooks_per_bandwidth_kbps=per_bandwidth,
        )

    def stepper(self) -> CausalStepper:
        """A new stepper of this model for live streams (app/streaming.py)."""
        return CausalStepper(self.model, self.info.codebooks, self.hop, self.bandwidth)

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # audio_codes: [chunks = 1, B, K, F] for an unchunked model
        return self.model.encode(wave, bandwidth=self.bandwidth, return_dict=True).audio_codes[0]

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        # one chunk, no volume scale
        return self.model.decode(tokens[None], [None], return_dict=True).audio_values


class DacCodec(FramedAudioCodec):
    """DacModel: bidirectional convolutions, factorised l2-normalised RVQ, mono."""

    OPTIONS = ("codebooks",)

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        config = model.config
        check_options(options, self.OPTIONS, "DacModel")
        self.codebooks = _codebooks(options, 1, int(config.n_codebooks), "DacModel")
        self.model = model
        self.device = device
        self.padding_safe = False
        self.info = _audio_info(
            config, config.sampling_rate, 1, int(config.hop_length), self.codebooks
        )

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        output = self.model.encode(wave, n_quantizers=self.codebooks, return_dict=True)
        return output.audio_codes

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        # audio_values: [B, T]; odd strides give a few samples short of F * hop
        return self.model.decode(audio_codes=tokens, return_dict=True).audio_values[:, None]


class MimiCodec(FramedAudioCodec):
    """MimiModel: causal SEANet + transformer, split RVQ (semantic codebooks first)."""

    OPTIONS = ("codebooks",)

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        config = model.config
        check_options(options, self.OPTIONS, "MimiModel")
        semantic = int(config.num_semantic_quantizers)
        self.codebooks = _codebooks(options, semantic, int(config.num_quantizers), "MimiModel")
        downsample = model.encoder.downsample
        stride = 1 if downsample is None else int(downsample.conv.stride[0])
        self.model = model
        self.device = device
        self.padding_safe = bool(config.use_causal_conv)
        self.info = _audio_info(
            config,
            config.sampling_rate,
            int(config.audio_channels),
            math.prod(config.upsampling_ratios) * stride,
            self.codebooks,
            causal=self.padding_safe,
            streaming=is_streamable(model),
            semantic_codebooks=semantic,
        )

    def stepper(self) -> CausalStepper:
        """A new stepper of this model for live streams (app/streaming.py)."""
        return CausalStepper(self.model, self.codebooks, self.hop)

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        output = self.model.encode(wave, num_quantizers=self.codebooks, return_dict=True)
        return output.audio_codes

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, return_dict=True).audio_values


class XcodecCodec(FramedAudioCodec):
    """XcodecModel: DAC acoustic + HuBERT-style semantic features, one RVQ, mono."""

    OPTIONS = ("bandwidth",)

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        config = model.config
        check_options(options, self.OPTIONS, "XcodecModel")
        self.bandwidth, per_bandwidth = _bandwidth(model, options, "XcodecModel")
        self.model = model
        self.device = device
        # the semantic model normalises and attends over the whole clip
        self.padding_safe = False
        self.info = _audio_info(
            config,
            config.sample_rate,
            1,
            int(config.hop_length),
            per_bandwidth[str(self.bandwidth)],
            bandwidth_kbps=self.bandwidth,
            codebooks_per_bandwidth_kbps=per_bandwidth,
        )

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.encode(wave, bandwidth=self.bandwidth, return_dict=True).audio_codes

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, return_dict=True).audio_values


class WavTokenizerCodec(FramedAudioCodec):
    """WavTokenizerModel: one codebook, SEANet encoder, Vocos (ISTFT) decoder, mono."""

    OPTIONS: tuple[str, ...] = ()

    def __init__(self, model: Any, options: dict[str, Any], device: torch.device) -> None:
        config = model.config
        check_options(options, self.OPTIONS, "WavTokenizerModel")
        self.model = model
        self.device = device
        # the decoder attends and overlaps its inverse STFT both ways
        self.padding_safe = False
        self.info = _audio_info(config, config.sampling_rate, 1, int(config.hop_length), 1)

    def encode_frames(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.encode(wave).audio_codes

    def decode_frames(self, tokens: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens).audio_values
