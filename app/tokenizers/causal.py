"""Causal codecs stepped a few frames at a time: EnCodec and Mimi (transformers) with per-stream
memory, so that streamed audio gives the tokens of the whole clip encoded at once.

A stream's ``StreamState`` holds what each layer needs of the past: a causal convolution its
last ``kernel - stride`` inputs, a transposed convolution the overlap it still owes the next
frames, an LSTM its (h, c), an attention layer its keys and values within the sliding window
(and how many positions it has seen). The states of several streams stack along the batch, so
one forward steps many streams; rows never mix (a row's keys are masked from the others).

The first step of a stream is special only where a convolution pads its left edge from the
signal itself (EnCodec's ``reflect``): it reads up to ``kernel - stride`` inputs ahead, so a
stream's first step waits for ``first_frames`` frames (or the end of the stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class NotStreamable(ValueError):
    """The model's layers see later samples (or whole-clip statistics): it cannot stream."""


@dataclass
class StreamState:
    """One stream's memory between steps: tensors [1, ...] by layer name, positions seen by
    each attention stack, and whether it has stepped yet."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    started: bool = False


def _class(module: nn.Module) -> str:
    return type(module).__name__


class CausalStepper:
    """Steps the encoder (wave -> tokens) or decoder (tokens -> wave) of an ``EncodecModel`` or
    ``MimiModel`` over a few whole frames of several streams at once.

    ``encode_step``: wave [B, C, n * hop] -> tokens [B, K, n]; ``decode_step``: tokens
    [B, k, n] -> wave [B, C, n * hop]; every row advances its own ``StreamState``.
    """

    def __init__(self, model: Any, codebooks: int, hop: int, bandwidth: float | None = None):
        config = model.config
        kind = _class(model)
        if kind not in ("EncodecModel", "MimiModel"):
            raise NotStreamable(f"{kind} has no streaming path here; EnCodec and Mimi do")
        if not config.use_causal_conv:
            raise NotStreamable(f"this {kind} has non-causal convolutions (use_causal_conv false)")
        if getattr(config, "norm_type", "weight_norm") == "time_group_norm":
            raise NotStreamable(f"this {kind} normalises each layer over the whole clip")
        if float(config.trim_right_ratio) != 1.0:
            raise NotStreamable(f"this {kind} trims its transposed convolutions on the left")
        self.model = model
        self.kind = kind
        self.codebooks = codebooks
        self.hop = hop
        self.bandwidth = bandwidth
        self.names = {module: name for name, module in model.named_modules()}
        self._weights: dict[nn.Module, torch.Tensor] = {}
        self.first_frames = {"encode": 1, "decode": 1}
        # (pad, inputs per frame) of each self-padding convolution, met in a first step of one
        # frame each way; recorded only then
        self._reach: list[tuple[int, int]] | None = []
        with torch.inference_mode():
            param = next(model.parameters())
            self.encode_step(param.new_zeros(1, int(config.audio_channels), hop), [StreamState()])
            self.first_frames["encode"] = self._first_frames()
            self._reach = []
            tokens = torch.zeros(1, codebooks, 1, dtype=torch.long, device=param.device)
            self.decode_step(tokens, [StreamState()])
            self.first_frames["decode"] = self._first_frames()
        self._reach = None

    def _first_frames(self) -> int:
        """Frames a first step needs so that every self-padding convolution reads only its own
        input: more than ``pad`` inputs where one frame gives ``per_frame`` of them."""
        return max([1, *(pad // per_frame + 1 for pad, per_frame in self._reach or [])])

    # -- the two directions ---------------------------------------------------------------

    def encode_step(self, wave: torch.Tensor, states: list[StreamState]) -> torch.Tensor:
        """wave [B, C, n * hop] -> tokens [B, K, n]."""
        frames = wave.shape[-1] // self.hop
        model = self.model
        if self.kind == "EncodecModel":
            latents = self._layers(model.encoder.layers, wave, states, frames)
            codes = model.quantizer.encode(latents, self.bandwidth)
        else:
            encoder = model.encoder
            x = self._layers(encoder.encoder_seanet.layers, wave, states, frames)
            x = self._transformer(encoder.encoder_transformer, x, states)
            if encoder.downsample is not None:
                x = self._conv(encoder.downsample, x, states, frames)
            codes = model.quantizer.encode(x, self.codebooks)
        for state in states:
            state.started = True
        return codes.transpose(0, 1)

    def decode_step(self, tokens: torch.Tensor, states: list[StreamState]) -> torch.Tensor:
        """tokens [B, k, n] -> wave [B, C, n * hop]."""
        frames = tokens.shape[-1]
        model = self.model
        if self.kind == "EncodecModel":
            latents = model.quantizer.decode(tokens.transpose(0, 1))
            wave = self._layers(model.decoder.layers, latents, states, frames)
        else:
            decoder = model.decoder
            x = model.quantizer.decode(tokens)
            if decoder.upsample is not None:
                x = self._transposed(decoder.upsample, x, states)
            x = self._transformer(decoder.decoder_transformer, x, states)
            wave = self._layers(decoder.decoder_seanet.layers, x, states, frames)
        for state in states:
            state.started = True
        return wave

    # -- layers ---------------------------------------------------------------------------

    def _layers(
        self, layers: Any, x: torch.Tensor, states: list[StreamState], frames: int
    ) -> torch.Tensor:
        for layer in layers:
            x = self._layer(layer, x, states, frames)
        return x

    def _layer(
        self, layer: Any, x: torch.Tensor, states: list[StreamState], frames: int
    ) -> torch.Tensor:
        kind = _class(layer)
        if kind.endswith("ConvTranspose1d"):
            return self._transposed(layer, x, states)
        if kind.endswith("Conv1d"):
            return self._conv(layer, x, states, frames)
        if kind.endswith("ResnetBlock"):
            hidden = x
            for inner in layer.block:
                hidden = self._layer(inner, hidden, states, frames)
            shortcut = layer.shortcut
            residual = (
                x if isinstance(shortcut, nn.Identity) else self._conv(shortcut, x, states, frames)
            )
            return residual + hidden
        if kind.endswith("LSTM"):
            return self._lstm(layer, x, states)
        if isinstance(layer, nn.ELU):
            return layer(x)
        raise NotStreamable(f"no streaming rule for layer {kind}")

    def _conv(
        self, layer: Any, x: torch.Tensor, states: list[StreamState], frames: int
    ) -> torch.Tensor:
        """A causal convolution: its input after the kept ``kernel - stride`` inputs of the
        stream (at a stream's start, the padding the layer itself gives its left edge)."""
        pad = int(layer.padding_total)
        if pad == 0:
            return self._convolve(layer.conv, x)
        name = self.names[layer]
        mode = layer.pad_mode
        if mode == "reflect" and self._reach is not None:
            self._reach.append((pad, x.shape[-1] // frames))
        if all(state.started for state in states):
            left = torch.cat([state.tensors[name] for state in states])
        else:
            fresh = layer._pad1d(x, (pad, 0), mode=mode)[..., :pad]
            left = torch.cat(
                [
                    state.tensors[name] if state.started else fresh[row : row + 1]
                    for row, state in enumerate(states)
                ]
            )
        full = torch.cat([left, x], dim=-1)
        kept = full[..., -pad:]
        for row, state in enumerate(states):
            state.tensors[name] = kept[row : row + 1].clone()
        return self._convolve(layer.conv, full)

    def _weight(self, conv: Any) -> torch.Tensor:
        """A convolution's weight, computed once: weight-normalised layers (EnCodec) would
        otherwise recompute it at every step of every stream."""
        weight = self._weights.get(conv)
        if weight is None:
            weight = self._weights[conv] = conv.weight.detach().clone()
        return weight

    def _convolve(self, conv: Any, x: torch.Tensor) -> torch.Tensor:
        return conv._conv_forward(x, self._weight(conv), conv.bias)

    def _transposed(self, layer: Any, x: torch.Tensor, states: list[StreamState]) -> torch.Tensor:
        """A causal transposed convolution: each step's outputs, plus what the previous step's
        inputs still owed them; what this step owes the next is kept."""
        conv = layer.conv
        stride = int(conv.stride[0])
        overlap = int(conv.kernel_size[0]) - stride
        out = F.conv_transpose1d(x, self._weight(conv), None, stride, groups=conv.groups)
        if overlap == 0:
            owed = out
        else:
            name = self.names[layer]
            carried = torch.cat(
                [
                    state.tensors[name]
                    if state.started
                    else out.new_zeros(1, *out.shape[1:2], overlap)
                    for state in states
                ]
            )
            head = out[..., :overlap] + carried
            owed = torch.cat([head, out[..., overlap:]], dim=-1)
            emitted = x.shape[-1] * stride
            for row, state in enumerate(states):
                state.tensors[name] = owed[row : row + 1, :, emitted:].clone()
            owed = owed[..., :emitted]
        if conv.bias is not None:
            owed = owed + conv.bias.view(1, -1, 1)
        return owed

    def _lstm(self, layer: Any, x: torch.Tensor, states: list[StreamState]) -> torch.Tensor:
        """EncodecLSTM: the LSTM over [T, B, C] from each stream's (h, c), plus its input."""
        name = self.names[layer]
        lstm = layer.lstm
        sequence = x.permute(2, 0, 1)
        zeros = sequence.new_zeros(lstm.num_layers, 1, lstm.hidden_size)
        hidden = tuple(
            torch.cat(
                [state.tensors[f"{name}.{part}"] if state.started else zeros for state in states],
                dim=1,
            )
            for part in ("h", "c")
        )
        out, (h, c) = lstm(sequence, hidden)
        for row, state in enumerate(states):
            state.tensors[f"{name}.h"] = h[:, row : row + 1].clone()
            state.tensors[f"{name}.c"] = c[:, row : row + 1].clone()
        return (out + sequence).permute(1, 2, 0)

    def _transformer(self, stack: Any, x: torch.Tensor, states: list[StreamState]) -> torch.Tensor:
        """MimiTransformerModel over x [B, C, n], each row after its own keys and values.

        Rows' pasts are left-aligned to a common length P and masked where a row has fewer, so
        position j of the keys is P + n - 1 - j steps before the newest query in every row; the
        sliding window keeps keys fewer than ``window`` steps back.
        """
        name = self.names[stack]
        window = stack.config.sliding_window
        batch, _, steps = x.shape
        hidden = x.transpose(1, 2)
        seen = [state.positions.get(name, 0) for state in states]
        held = [_kept(p, window) for p in seen]
        past = max(held)
        positions = torch.tensor(seen, device=x.device)[:, None] + torch.arange(
            steps, device=x.device
        )
        cos, sin = stack.rotary_emb(hidden, positions)
        keys_at = torch.arange(past + steps, device=x.device)
        queries_at = past + torch.arange(steps, device=x.device)
        distance = queries_at[:, None] - keys_at[None, :]
        allowed = distance >= 0
        if window is not None:
            allowed = allowed & (distance < window)
        starts = past - torch.tensor(held, device=x.device)
        valid = keys_at[None, :] >= starts[:, None]
        mask = (allowed[None] & valid[:, None, :])[:, None]
        for index, layer in enumerate(stack.layers):
            attention = layer.self_attn
            residual = hidden
            normed = layer.input_layernorm(hidden)
            shape = (batch, steps, -1, attention.head_dim)
            query = attention.q_proj(normed).view(shape).transpose(1, 2)
            key = attention.k_proj(normed).view(shape).transpose(1, 2)
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            query, key = _rotate(query, key, cos, sin)
            key = _with_past(f"{name}.k{index}", key, states, past, window)
            value = _with_past(f"{name}.v{index}", value, states, past, window)
            groups = attention.num_key_value_groups
            attended = F.scaled_dot_product_attention(
                query,
                key.repeat_interleave(groups, dim=1),
                value.repeat_interleave(groups, dim=1),
                attn_mask=mask,
                scale=attention.scaling,
            )
            attended = attention.o_proj(attended.transpose(1, 2).reshape(batch, steps, -1))
            hidden = residual + layer.self_attn_layer_scale(attended)
            feed = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + layer.mlp_layer_scale(feed)
        for row, state in enumerate(states):
            state.positions[name] = seen[row] + steps
        return hidden.transpose(1, 2)


def _kept(seen: int, window: int | None) -> int:
    """Past positions an attention layer keeps: the window's, or all of them."""
    return seen if window is None else min(seen, window - 1)


def _with_past(
    name: str, new: torch.Tensor, states: list[StreamState], past: int, window: int | None
) -> torch.Tensor:
    """new [B, H, n, D] after each row's kept past, left-padded to ``past``; each row's newest
    kept positions are stored again."""
    rows = []
    for row, state in enumerate(states):
        held = state.tensors.get(name, new.new_zeros(1, new.shape[1], 0, new.shape[3]))
        padding = new.new_zeros(1, new.shape[1], past - held.shape[2], new.shape[3])
        rows.append(torch.cat([padding, held, new[row : row + 1]], dim=2))
        keep = _kept(held.shape[2] + new.shape[2], window)
        state.tensors[name] = rows[-1][:, :, rows[-1].shape[2] - keep :].clone()
    return torch.cat(rows)


def _rotate(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of query and key [B, H, n, D] at cos, sin [B, n, D] (as Mimi's)."""
    cos, sin = cos[:, None], sin[:, None]

    def half(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    return query * cos + half(query) * sin, key * cos + half(key) * sin


def is_streamable(model: Any) -> bool:
    """Whether ``CausalStepper`` can step this transformers model."""
    config = getattr(model, "config", None)
    return (
        _class(model) in ("EncodecModel", "MimiModel")
        and bool(getattr(config, "use_causal_conv", False))
        and getattr(config, "norm_type", "weight_norm") != "time_group_norm"
        and math.isclose(float(getattr(config, "trim_right_ratio", 1.0)), 1.0)
    )
