"""Sequence layouts: tokens to one flat id space and back, checked ranges, generated sequences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokserve_client import pack_streams, unpack_streams
from tokserve_client.layouts import Layout, LayoutError, load_layout, load_layouts

from app.tokenizers.base import AudioInfo, ImageInfo, TokenizerInfo
from tests.support import REPO_ROOT

GRID = ImageInfo(vocab_size=64000, image_size=(256, 256), grid=(32, 32), downsample=8)
CODEC = AudioInfo(
    vocab_size=1024, codebooks=8, sample_rate=24000, channels=1, hop_length=320, frame_rate=75
)
SNAC = AudioInfo(
    vocab_size=4096,
    codebooks=3,
    sample_rate=24000,
    channels=1,
    hop_length=2048,
    frame_rate=24000 / 2048,
    tokens_per_frame=(1, 2, 4),
)
SHIPPED = {"image-fsq-256": GRID.to_dict(), "audio-rvq-24k": CODEC.to_dict()}
RNG = np.random.default_rng(7)


def layout_file(tmp_path: Path, spec: dict[str, Any]) -> Path:
    path = tmp_path / f"{spec.get('name', 'test')}.json"
    path.write_text(json.dumps(spec))
    return path


def small(models: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A layout over a 100-id text vocabulary with the usual markers."""
    markers = {"boi": 100, "eoi": 101, "eol": 102, "boa": 103, "eoa": 104, "pad": 105}
    return {"name": "test", "vocab_size": 200_000, "text_vocab_size": 100,
            "markers": markers, "models": models, **overrides}  # fmt: skip


def load(tmp_path: Path, spec: dict[str, Any], infos: dict[str, TokenizerInfo]) -> Layout:
    """``spec`` written to a file and loaded over these models' figures (/v1/models entries)."""
    return load_layout(layout_file(tmp_path, spec), {k: v.to_dict() for k, v in infos.items()})


def generic() -> Layout:
    return load_layouts(REPO_ROOT / "layouts", SHIPPED)["generic"]


def test_the_generic_layout_lays_an_image_out_row_by_row_with_end_of_row_markers() -> None:
    grid = RNG.integers(0, 64000, (32, 32))
    ids = generic().to_ids("image-fsq-256", grid)
    assert ids[0] == 128256 and ids[-1] == 128257 and len(ids) == 2 + 32 * 33
    assert ids[1:34].tolist() == [*(grid[0] + 128261).tolist(), 128258]


def test_the_generic_layout_lays_a_clip_out_frame_by_frame() -> None:
    codes = RNG.integers(0, 1024, (8, 5))
    ids = generic().to_ids("audio-rvq-24k", codes)
    assert ids[1:9].tolist() == [192261 + k * 1024 + codes[k, 0] for k in range(8)]
    assert len(ids) == 2 + 40


SEQUENCE = ImageInfo(vocab_size=4096, image_size=(256, 256), grid=(32,), downsample=0)


def test_a_sequence_of_image_ids_round_trips_and_a_wrong_length_is_named(tmp_path: Path) -> None:
    layout = load(tmp_path, small({"titok": {"begin": "boi", "end": "eoi", "offset": 1000}}), {
        "titok": SEQUENCE
    })  # fmt: skip
    tokens = RNG.integers(0, 4096, 32)
    ids = layout.to_ids("titok", tokens)
    assert ids.tolist() == [100, *(tokens + 1000).tolist(), 101]
    assert np.array_equal(layout.from_ids("titok", ids), tokens)
    with pytest.raises(ValueError, match=r"^a sequence of 32 ids is 32 ids, not 31$"):
        layout.from_ids("titok", ids[:-2])
    with pytest.raises(ValueError, match="position 3"):
        layout.from_ids("titok", [*ids[:3], 7, *ids[4:]])


@pytest.mark.parametrize("model", ["image-fsq-256", "audio-rvq-24k"])
def test_ids_to_tokens_to_ids_is_exact_for_the_generic_layout(model: str) -> None:
    shape = (32, 32) if model == "image-fsq-256" else (8, 37)
    tokens = RNG.integers(0, SHIPPED[model]["vocab_size"], shape)
    layout = generic()
    ids = layout.to_ids(model, tokens)
    assert np.array_equal(layout.from_ids(model, ids), tokens)
    assert np.array_equal(layout.to_ids(model, layout.from_ids(model, ids)), ids)


@pytest.mark.parametrize("order", ["frame", "codebook", "delay"])
def test_every_audio_order_round_trips_exactly(tmp_path: Path, order: str) -> None:
    entry = {"begin": "boa", "end": "eoa", "offset": 1000, "order": order, "pad": "pad"}
    layout = load(tmp_path, small({"codec": entry}), {"codec": CODEC})
    tokens = RNG.integers(0, 1024, (8, 11))
    ids = layout.to_ids("codec", tokens)
    assert np.array_equal(layout.from_ids("codec", ids), tokens)


def test_the_delay_order_starts_each_codebook_one_step_later(tmp_path: Path) -> None:
    entry = {"begin": "boa", "end": "eoa", "offset": 1000, "order": "delay", "pad": "pad"}
    info = AudioInfo(
        vocab_size=10, codebooks=3, sample_rate=8000, channels=1, hop_length=80, frame_rate=100
    )
    layout = load(tmp_path, small({"codec": entry}), {"codec": info})
    tokens = np.array([[1, 2], [3, 4], [5, 6]])
    steps = layout.to_ids("codec", tokens)[1:-1].reshape(-1, 3)
    # row k of step t holds frame t - k of codebook k (offset 1000 + 10 k), the pad elsewhere
    assert steps.tolist() == [
        [1001, 105, 105],
        [1002, 1013, 105],
        [105, 1014, 1025],
        [105, 105, 1026],
    ]


def test_a_row_order_interleaves_snac_levels_as_each_frame_lists_them(tmp_path: Path) -> None:
    entry = {"begin": "boa", "end": "eoa", "offset": 1000, "row_order": [0, 1, 3, 4, 2, 5, 6]}
    layout = load(tmp_path, small({"snac": entry}), {"snac": SNAC})
    tokens = np.arange(7)[:, None] * 10 + np.arange(2)  # row r, frame f -> 10 r + f
    frame = layout.to_ids("snac", tokens)[1:8]
    assert (frame - 1000 - np.arange(7) * 4096).tolist() == [0, 10, 30, 40, 20, 50, 60]
    assert np.array_equal(layout.from_ids("snac", layout.to_ids("snac", tokens)), tokens)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"text_vocab_size": 101},
            "layout test: text [0, 101) and marker boi [100, 101) overlap",
        ),
        (
            {"vocab_size": 9000},
            "layout test: codec codes [1000, 9192) is outside its vocabulary of 9000 ids",
        ),
    ],
    ids=["overlap", "beyond-vocabulary"],
)
def test_a_layout_whose_ranges_clash_is_refused_in_one_sentence(
    tmp_path: Path, change: dict[str, Any], problem: str
) -> None:
    spec = small({"codec": {"begin": "boa", "end": "eoa", "offset": 1000}}, **change)
    with pytest.raises(LayoutError) as refused:
        load(tmp_path, spec, {"codec": CODEC})
    assert str(refused.value) == problem


def test_a_layout_naming_an_unknown_marker_is_refused(tmp_path: Path) -> None:
    spec = small({"codec": {"begin": "bos", "end": "eoa", "offset": 1000}})
    with pytest.raises(LayoutError, match="codec's begin names no marker 'bos'"):
        load(tmp_path, spec, {"codec": CODEC})


def test_layouts_for_models_that_are_not_loaded_are_skipped(tmp_path: Path) -> None:
    layout_file(tmp_path, small({"codec": {"begin": "boa", "end": "eoa", "offset": 1000}}))
    assert load_layouts(tmp_path, {"other": CODEC.to_dict()}) == {}
    assert list(load_layouts(tmp_path, {"codec": CODEC.to_dict()})) == ["test"]


def test_a_generated_sequence_splits_into_its_text_and_media_spans_in_order() -> None:
    layout = generic()
    grid = RNG.integers(0, 64000, (32, 32))
    codes = RNG.integers(0, 1024, (8, 6))
    text = [RNG.integers(0, 128256, n).tolist() for n in (5, 3, 4)]
    image, clip = layout.to_ids("image-fsq-256", grid), layout.to_ids("audio-rvq-24k", codes)
    sequence = [*text[0], *image, *text[1], *clip, *text[2]]
    spans = layout.split(sequence)
    assert [(s.kind, s.start, s.end, s.model) for s in spans] == [
        ("text", 0, 5, None),
        ("media", 5, 5 + len(image), "image-fsq-256"),
        ("text", 5 + len(image), 8 + len(image), None),
        ("media", 8 + len(image), 8 + len(image) + len(clip), "audio-rvq-24k"),
        ("text", 8 + len(image) + len(clip), len(sequence), None),
    ]
    assert np.array_equal(spans[1].tokens, grid) and np.array_equal(spans[3].tokens, codes)


def test_malformed_spans_carry_their_problem_and_position() -> None:
    layout = generic()
    grid = layout.to_ids("image-fsq-256", RNG.integers(0, 64000, (32, 32))).tolist()
    ragged = [*grid[:34], *grid[35:]]  # the second row's first code lost
    out_of_range = layout.to_ids("audio-rvq-24k", RNG.integers(0, 1024, (8, 2))).tolist()
    out_of_range[3] = 7  # a text id inside the clip
    truncated = grid[:100]  # generation stopped before the end marker
    spans = layout.split([1, *ragged, 2, *out_of_range, 3, *truncated])
    problems = [(s.kind, s.start, s.problem) for s in spans if s.kind == "media"]
    clip_at = 2 + len(ragged)
    tail_at = clip_at + 1 + len(out_of_range)
    assert problems == [
        ("media", 1, "a 32 x 32 grid is 1056 ids here, not 1055"),
        ("media", clip_at, f"id 7 at position {clip_at + 3} is not one of audio-rvq-24k's "
         "codes: that place takes 194309 to 195332"),
        ("media", tail_at, f"the image-fsq-256 span opened at {tail_at} is not closed before "
         "the end"),
    ]  # fmt: skip


def test_an_end_of_row_out_of_place_is_named_by_its_position() -> None:
    layout = generic()
    ids = layout.to_ids("image-fsq-256", RNG.integers(0, 64000, (32, 32))).tolist()
    ids[33], ids[34] = ids[34], ids[33]  # the first end of row one place late
    (span,) = layout.split(ids)
    assert span.problem == (
        "a 32 x 32 grid ends each row of 32 codes with the end of row marker; position 33 "
        "breaks that"
    )


def test_a_code_in_a_delay_patterns_gap_is_named_by_its_position(tmp_path: Path) -> None:
    entry = {"begin": "boa", "end": "eoa", "offset": 1000, "order": "delay", "pad": "pad"}
    layout = load(tmp_path, small({"codec": entry}), {"codec": CODEC})
    ids = layout.to_ids("codec", RNG.integers(0, 1024, (8, 4))).tolist()
    ids[2] = 1000  # step 0 of codebook 1 is before its first frame
    with pytest.raises(ValueError, match="position 2 lies in the delay pattern's gap"):
        layout.from_ids("codec", ids)


def orpheus_tokenise_audio(levels: list[np.ndarray]) -> list[int]:
    """Orpheus TTS's own interleaving of SNAC's three levels (its tokenise_audio, in Canopy
    Labs' data-preparation notebook and orpheus_tts/decoder.py's inverse): 7 ids per frame."""
    ids = []
    for i in range(len(levels[0])):
        ids += [
            levels[0][i] + 128266,
            levels[1][2 * i] + 128266 + 4096,
            levels[2][4 * i] + 128266 + 2 * 4096,
            levels[2][4 * i + 1] + 128266 + 3 * 4096,
            levels[1][2 * i + 1] + 128266 + 4 * 4096,
            levels[2][4 * i + 2] + 128266 + 5 * 4096,
            levels[2][4 * i + 3] + 128266 + 6 * 4096,
        ]
    return ids


def test_the_orpheus_preset_lays_snac_out_as_orpheus_does() -> None:
    layout = load_layout(REPO_ROOT / "layouts" / "orpheus-snac.json", {"snac-24k": SNAC.to_dict()})
    levels = [RNG.integers(0, 4096, n) for n in (9, 18, 36)]
    ids = layout.to_ids("snac-24k", pack_streams(levels, [1, 2, 4]))
    assert ids.tolist() == [128257, *orpheus_tokenise_audio(levels), 128258]
    assert [s.tolist() for s in unpack_streams(layout.from_ids("snac-24k", ids), [1, 2, 4])] == [
        level.tolist() for level in levels
    ]


def test_the_musicgen_preset_is_transformers_delay_pattern_flattened() -> None:
    transformers = pytest.importorskip("transformers")
    info = AudioInfo(
        vocab_size=2048, codebooks=4, sample_rate=32000, channels=1, hop_length=640, frame_rate=50
    )
    layout = load_layout(
        REPO_ROOT / "layouts" / "musicgen-delay.json", {"encodec-32k": info.to_dict()}
    )
    codes = RNG.integers(0, 2048, (4, 10))
    config = transformers.MusicgenDecoderConfig(
        vocab_size=2048, num_codebooks=4, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, ffn_dim=32,
    )  # fmt: skip
    musicgen = transformers.MusicgenForCausalLM(config)
    prompt = torch.cat([torch.full((4, 1), 2048), torch.from_numpy(codes)], dim=1)
    _, pattern = musicgen.build_delay_pattern_mask(prompt, pad_token_id=2048, max_length=14)
    steps = layout.to_ids("encodec-32k", codes)[1:-1].reshape(-1, 4)
    as_streams = np.where(steps == 8192, 2048, steps - np.arange(4) * 2048)
    assert np.array_equal(as_streams.T, pattern.numpy())
