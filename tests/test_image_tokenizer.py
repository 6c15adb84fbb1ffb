"""The native image tokenizer's better encodings: the feedback pass and the encode-time search."""

from __future__ import annotations

import pytest
import torch

from app.tokenizers.image import FSQImageTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_tokenizer(
    refine_steps: int, feedback_width: int = 0, feedback_steps: int = 1
) -> FSQImageTokenizer:
    """The same encoder and decoder weights for any settings; a feedback pass is added last."""
    torch.manual_seed(0)
    arch = {"image_size": 32, "channels": [8, 16], "res_blocks": 1, "levels": [5, 5, 3]}
    tokenizer = FSQImageTokenizer(**arch, refine_steps=refine_steps, refine_lr=0.05)
    if feedback_width:
        with_feedback = FSQImageTokenizer(
            **arch,
            refine_steps=refine_steps,
            feedback_width=feedback_width,
            feedback_steps=feedback_steps,
        )
        with_feedback.load_state_dict({**with_feedback.state_dict(), **tokenizer.state_dict()})
        tokenizer = with_feedback
    return tokenizer.eval()


def smooth_images() -> torch.Tensor:
    """Three 32 x 32 gradients with a little noise: pixels [3, 3, 32, 32] in [-1, 1]."""
    generator = torch.Generator().manual_seed(1)
    ramp = torch.linspace(-0.8, 0.8, 32)
    base = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32)])
    images = [base[i % 2].expand(3, 32, 32) * (0.5 + 0.25 * i) for i in range(3)]
    return torch.stack(images) + 0.05 * torch.randn(3, 3, 32, 32, generator=generator)


def errors(tokenizer: FSQImageTokenizer, pixels: torch.Tensor) -> torch.Tensor:
    """Each image's mean squared error after encode and decode, run as the service runs them
    (under inference mode, on weights loaded outside it): [B]."""
    with torch.inference_mode():
        recon = tokenizer.decode(tokenizer.encode(pixels))
    return (recon - pixels).square().flatten(1).mean(dim=1)


def test_refined_codes_decode_closer_to_each_image_than_one_pass_codes() -> None:
    pixels = smooth_images()
    one_pass = errors(tiny_tokenizer(0), pixels)
    refined = errors(tiny_tokenizer(8), pixels)
    assert bool((refined < one_pass - 1e-4).all()), (refined, one_pass)


def test_refining_under_inference_mode_leaves_the_weights_and_their_gradients_alone() -> None:
    tokenizer = tiny_tokenizer(4)
    before = {name: p.detach().clone() for name, p in tokenizer.named_parameters()}
    with torch.inference_mode():
        tokenizer.encode(smooth_images())
    for name, parameter in tokenizer.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None, name


def test_an_image_refines_to_the_same_tokens_alone_as_in_a_batch() -> None:
    tokenizer = tiny_tokenizer(8)
    pixels = smooth_images()
    with torch.inference_mode():
        batch = tokenizer.encode(pixels)
        for i in range(len(pixels)):
            assert torch.equal(tokenizer.encode(pixels[i : i + 1])[0], batch[i]), i


def test_refinement_settings_out_of_range_are_refused_with_their_values() -> None:
    with pytest.raises(ValueError, match="refine_steps -1"):
        tiny_tokenizer(-1)


@pytest.mark.parametrize("steps", [1, 2])
def test_an_untrained_feedback_pass_leaves_every_token_as_the_encoder_gives_it(steps: int) -> None:
    pixels = smooth_images()
    with torch.inference_mode():
        plain = tiny_tokenizer(0).encode(pixels)
        with_feedback = tiny_tokenizer(0, feedback_width=4, feedback_steps=steps)
        assert torch.equal(with_feedback.encode(pixels), plain)


@pytest.mark.parametrize("steps", [1, 2])
def test_a_trained_feedback_pass_finds_codes_that_decode_closer_to_each_image(steps: int) -> None:
    pixels = smooth_images()
    tokenizer = tiny_tokenizer(0, feedback_width=4, feedback_steps=steps)
    assert tokenizer.feedback is not None
    optimizer = torch.optim.Adam(tokenizer.feedback.parameters(), lr=3e-3)
    before = errors(tokenizer, pixels)
    for _ in range(60):
        loss = (tokenizer(pixels) - pixels).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = errors(tokenizer, pixels)
    assert bool((after < before - 1e-4).all()), (after, before)


def test_a_feedback_pass_taken_no_times_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="feedback_steps 0"):
        tiny_tokenizer(0, feedback_width=4, feedback_steps=0)
