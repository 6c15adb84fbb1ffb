"""The playground in a real browser: Debian's headless Chromium, driven through chromium-driver.

The page is loaded from a real server of the shipped models; the example photo and speech are
uploaded through its file input; the figures it shows must be the API's own (version, shape,
bit rate, duration, cache, and the quality ?report=true measures), and those quality figures
must agree with the same figures computed here from the server's preprocessing and its decode
answer. Screenshots are kept in test-artifacts/.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from app.media import decode_audio, decode_image
from bench.server import server_process
from tests.support import LONG_CLIP, REPO_ROOT, causal_repo

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

EXAMPLES = REPO_ROOT / "examples"
ARTIFACTS = REPO_ROOT / "test-artifacts"
MODELS = "image-fsq-256,audio-rvq-24k"
WAIT_S = 120  # a loaded 2-core machine: model forwards, chromium's start, the page's figures


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with server_process(REPO_ROOT / "models", TOKSERVE_MODELS=MODELS) as (_, url):
        yield url


def chromium(*arguments: str) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with these extra command-line ``arguments``, quit at the end."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", *arguments):
        options.add_argument(argument)
    options.add_argument("--window-size=1200,1800")
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    yield from chromium()


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of the luma over every 7 x 7 window, as the page computes it."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = (
        sliding_window_view(a @ weights, (window, window)),
        sliding_window_view(b @ weights, (window, window)),
    )
    n = window * window
    mx, my = x.mean(axis=(2, 3)), y.mean(axis=(2, 3))
    vx, vy = x.var(axis=(2, 3), ddof=1), y.var(axis=(2, 3), ddof=1)
    cov = ((x - mx[..., None, None]) * (y - my[..., None, None])).sum(axis=(2, 3)) / (n - 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def mel_distance(
    a: np.ndarray, b: np.ndarray, rate: int, size: int = 1024, hop: int = 256, bands: int = 80
) -> float:
    """Mean |log10 mel(a) - log10 mel(b)|, with the page's frames and triangular filters."""
    top = 2595 * math.log10(1 + rate / 2 / 700)
    edges = [700 * (10 ** (top * i / (bands + 1) / 2595) - 1) for i in range(bands + 2)]
    bins = [f * size / rate for f in edges]
    filters = np.zeros((bands, size // 2 + 1))
    for k in range(bands):
        for column in range(math.floor(bins[k]), min(math.ceil(bins[k + 2]), size // 2) + 1):
            rise = (column - bins[k]) / (bins[k + 1] - bins[k])
            fall = (bins[k + 2] - column) / (bins[k + 2] - bins[k + 1])
            filters[k, column] = max(0.0, min(rise, fall))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)

    def log_mel(signal: np.ndarray) -> np.ndarray:
        frames = sliding_window_view(signal.astype(np.float64), size)[::hop] * window
        power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
        return np.log10(np.maximum(power @ filters.T, 1e-10))

    return float(np.mean(np.abs(log_mel(a) - log_mel(b))))


def run_page(browser: webdriver.Chrome, url: str, media: Path, model: str) -> dict[str, str]:
    """Load the page, choose ``media``, encode and decode with ``model``; the figures shown."""
    browser.get(f"{url}/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) > 0)
    browser.find_element(By.ID, "file").send_keys(str(media))
    wait.until(
        lambda b: (
            model
            in [o.get_attribute("value") for o in Select(b.find_element(By.ID, "model")).options]
        )
    )
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    browser.find_element(By.ID, "run").click()
    wait.until(
        lambda b: (
            b.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1"
            or "error" in b.find_element(By.ID, "status").get_attribute("class")
        )
    )
    status = browser.find_element(By.ID, "status")
    assert status.text == "done", status.text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"playground-{model}.png"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#figures tr")
    return {
        row.get_attribute("data-figure"): row.find_elements(By.TAG_NAME, "td")[1].text
        for row in rows
    }


def through_api(server: str, route: str, model: str, media: bytes) -> tuple[dict, dict, bytes]:
    """The model's entry, the media's encoded item (with its quality report) and its tokens
    decoded, asked of the API."""
    entry = httpx.get(f"{server}/v1/models/{model}", timeout=30).json()
    url = f"{server}/v1/{route}"
    encoded = httpx.post(f"{url}/encode?model={model}&report=true", content=media, timeout=60)
    item = encoded.json()["items"][0]
    decoded = httpx.post(
        f"{url}/decode", json={"model": model, "tokens": item["tokens"]}, timeout=60
    )
    return entry, item, decoded.content


def test_the_page_encodes_and_decodes_a_photo_with_the_apis_figures(
    server: str, browser: webdriver.Chrome
) -> None:
    photo = (EXAMPLES / "photo.jpg").read_bytes()
    shown = run_page(browser, server, EXAMPLES / "photo.jpg", "image-fsq-256")
    model, item, png = through_api(server, "images", "image-fsq-256", photo)

    height, width = model["image_size"]
    bits = math.log2(model["vocab_size"]) * item["shape"][0] * item["shape"][1]
    assert shown["version"] == model["version"]
    assert shown["shape"] == "32 × 32" and shown["tokens"] == "1024"
    assert shown["bits per pixel"] == f"{bits / (height * width):.4f}"
    assert [float(v) for v in shown["crop box"].split(", ")] == item["crop_box"]
    assert shown["cached"] == "false" and item["cached"] is True  # the page's request came first
    seen = ((decode_image(photo, (height, width)) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    psnr = 10 * math.log10(255**2 / np.mean((seen - decoded) ** 2))
    # the page shows the server's report: the same reconstruction measured the same way
    assert shown["PSNR dB"] == f"{item['quality']['psnr_db']:.2f}"
    assert shown["SSIM"] == f"{item['quality']['ssim']:.4f}"
    assert shown["resize filter"] == item["resize_filter"] == "bicubic"
    assert item["quality"]["psnr_db"] == pytest.approx(psnr, abs=1e-6)
    assert item["quality"]["ssim"] == pytest.approx(ssim(seen, decoded), abs=1e-6)
    shown_size = browser.execute_script(
        "const img = document.querySelector('#reconstruction img');"
        "return [img.naturalWidth, img.naturalHeight];"
    )
    assert shown_size == [width, height]


def test_the_page_encodes_and_decodes_speech_with_the_apis_figures(
    server: str, browser: webdriver.Chrome
) -> None:
    speech = (EXAMPLES / "speech.ogg").read_bytes()
    shown = run_page(browser, server, EXAMPLES / "speech.ogg", "audio-rvq-24k")
    model, item, wav = through_api(server, "audio", "audio-rvq-24k", speech)

    kbps = math.log2(model["vocab_size"]) * model["codebooks"] * model["frame_rate"] / 1000
    assert shown["version"] == model["version"]
    assert shown["shape"] == f"{model['codebooks']} × {item['frames']}"
    assert shown["kbit/s"] == f"{kbps:.3f}"
    assert shown["duration s"] == str(item["duration_s"])
    assert shown["source"] == f"{item['source_sample_rate']} Hz × {item['source_channels']} ch"
    original = decode_audio(speech, model["sample_rate"])[0][0].numpy()
    decoded, _ = sf.read(io.BytesIO(wav), dtype="float32")
    length = min(len(original), len(decoded))
    noise = np.sum((original[:length] - decoded[:length]) ** 2)
    snr = 10 * math.log10(np.sum(original[:length] ** 2) / noise)
    assert shown["SNR dB"] == f"{item['quality']['snr_db']:.2f}"
    assert shown["mel distance"] == f"{item['quality']['mel_distance']:.4f}"
    assert shown["preprocessing"] == "none"  # the example is 24 kHz mono, as the model takes
    # the decode answer is a 16-bit WAV, the report measures the float reconstruction
    assert abs(item["quality"]["snr_db"] - snr) < 0.05, (item["quality"], snr)
    mel = mel_distance(original[:length], decoded[:length], model["sample_rate"])
    assert item["quality"]["mel_distance"] == pytest.approx(mel, rel=0.01)


@pytest.fixture(scope="module")
def causal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server of tiny causal codecs (Mimi, EnCodec) beside the tiny native one."""
    root = causal_repo(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("checkpoints"))
    with server_process(root, TOKSERVE_MODELS="mimi,encodec,tiny-audio") as (_, url):
        yield url


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Chromium whose microphone plays real speech (a fake capture device, no prompt)."""
    speech = tmp_path_factory.mktemp("microphone") / "speech.wav"
    wave = decode_audio(LONG_CLIP.read_bytes(), 16000)[0][0].numpy()
    sf.write(speech, wave, 16000, subtype="PCM_16")
    yield from chromium(
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={speech}",
        "--autoplay-policy=no-user-gesture-required",
    )


def test_live_streams_the_microphone_through_a_causal_codec_and_plays_every_frame(
    causal_server: str, microphone: webdriver.Chrome
) -> None:
    microphone.get(f"{causal_server}/")
    wait = WebDriverWait(microphone, WAIT_S)
    live = wait.until(lambda b: b.find_element(By.ID, "live"))
    wait.until(lambda b: live.is_displayed())
    Select(microphone.find_element(By.ID, "model")).select_by_value("mimi")
    live.click()
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-live") == "on")
    status = microphone.find_element(By.ID, "status")
    wait.until(lambda b: re.search(r": ([1-9]\d*) frames encoded", status.text))
    time.sleep(2.0)  # a few seconds of speech
    live.click()
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-live") == "done")
    shown = re.fullmatch(r"live with mimi: (\d+) frames encoded, (\d+) frames played", status.text)
    assert shown, status.text
    encoded, played = int(shown[1]), int(shown[2])
    assert encoded >= 25 and played == encoded  # 25 frames per second


def test_the_live_button_is_hidden_when_no_model_streams(
    server: str, browser: webdriver.Chrome
) -> None:
    browser.get(f"{server}/")
    WebDriverWait(browser, WAIT_S).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) > 0
    )
    assert not browser.find_element(By.ID, "live").is_displayed()
