// tokserve playground: one file -> tokens -> reconstruction, with the figures that say how good.
// Everything here talks to the public HTTP API (docs/api.md); quality figures are computed in
// the page from the original, prepared as the server prepared it, and the reconstruction.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "tokserve-api-key";
const state = { models: [], file: null, kind: null, urls: [] };

// ---- the API ---------------------------------------------------------------------------------

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.set("X-API-Key", key);
  const response = await fetch(path, { ...init, headers });
  if (response.status === 401) {
    $("key-panel").hidden = false;
    throw new Error("This server needs an API key: enter one above.");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch { /* not problem+json */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

async function loadModels() {
  const answer = await (await api("/v1/models")).json();
  state.models = answer.models;
  fillModels();
}

// ---- choosing a file -------------------------------------------------------------------------

function kindOf(file) {
  if (file.type.startsWith("image/")) return "image";
  if (file.type.startsWith("audio/") || file.type === "video/ogg") return "audio";
  return /\.(png|jpe?g|webp|gif|bmp|tiff?)$/i.test(file.name) ? "image" : "audio";
}

function choose(file) {
  state.file = file;
  state.kind = kindOf(file);
  fillModels();
  setStatus(`${file.name}: ${state.kind}, ${(file.size / 1024).toFixed(1)} KiB`);
}

function fillModels() {
  const models = state.models.filter((m) => !state.kind || m.modality === state.kind);
  $("model").replaceChildren(...models.map((m) => new Option(`${m.name} (${m.modality})`, m.name)));
  $("run").disabled = !state.file || models.length === 0;
  $("resize-field").hidden = state.kind !== "image";
  fillCodebooks();
}

function fillCodebooks() {
  const model = currentModel();
  const audio = model && model.modality === "audio";
  $("codebooks-field").hidden = !audio;
  if (!audio) return;
  const options = [];
  for (let k = model.codebooks; k >= 1; k--) options.push(new Option(String(k), String(k)));
  $("codebooks").replaceChildren(...options);
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// ---- encode, decode, show --------------------------------------------------------------------

async function run() {
  const model = currentModel();
  const kind = model.modality;
  const route = kind === "image" ? "images" : "audio";
  const query = new URLSearchParams({ model: model.name });
  if (kind === "image") query.set("resize", $("resize").value);
  else query.set("codebooks", $("codebooks").value);
  $("run").disabled = true;
  setStatus("encoding…");
  try {
    let started = performance.now();
    const encoded = await (await api(`/v1/${route}/encode?${query}`, {
      method: "POST", body: state.file,
    })).json();
    const encodeMs = performance.now() - started;
    const item = encoded.items[0];
    let reconstruction = null;
    let decodeMs = null;
    if (!model.encode_only) {
      setStatus("decoding…");
      started = performance.now();
      reconstruction = await (await api(`/v1/${route}/decode`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: model.name, tokens: item.tokens }),
      })).blob();
      decodeMs = performance.now() - started;
    }
    await show(model, encoded, item, reconstruction, encodeMs, decodeMs);
    setStatus(model.encode_only ? "done (encode-only model: no reconstruction)" : "done");
    document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("run").disabled = false;
  }
}

async function show(model, encoded, item, reconstruction, encodeMs, decodeMs) {
  state.urls.forEach((url) => URL.revokeObjectURL(url));
  state.urls = [];
  $("original").replaceChildren(mediaElement(model.modality, state.file));
  $("reconstruction").replaceChildren(
    reconstruction ? mediaElement(model.modality, reconstruction) : document.createTextNode("—"),
  );
  drawTokens(item, model);
  const figures = [
    ["model", encoded.model],
    ["version", encoded.version],
    ["shape", item.shape.join(" × ")],
    ["tokens", String(item.shape.reduce((a, b) => a * b, 1))],
    ["vocabulary", String(model.vocab_size)],
  ];
  const bits = Math.log2(model.vocab_size);
  if (model.modality === "image") {
    const [height, width] = model.image_size;
    const tokens = item.shape.reduce((a, b) => a * b, 1);
    const bpp = (bits * tokens) / (height * width);
    figures.push(["bits per pixel", bpp.toFixed(4)]);
    figures.push(["crop box", item.crop_box.join(", ")]);
    if (reconstruction) {
      const quality = await imageQuality(state.file, reconstruction, item, model);
      figures.push(["PSNR dB", quality.psnr.toFixed(2)], ["SSIM", quality.ssim.toFixed(4)]);
    }
  } else {
    // one token per row of the token array and frame (codebooks at several rates fill more rows)
    const kbps = (bits * item.shape[0] * item.frame_rate) / 1000;
    figures.push(["kbit/s", kbps.toFixed(3)]);
    figures.push(["duration s", String(item.duration_s)]);
    figures.push(["source", `${item.source_sample_rate} Hz × ${item.source_channels} ch`]);
    if (reconstruction) {
      const quality = await audioQuality(state.file, reconstruction, model.sample_rate);
      figures.push(["SNR dB", quality.snr.toFixed(2)], ["mel distance", quality.mel.toFixed(4)]);
    }
  }
  figures.push(["encode ms", encodeMs.toFixed(1)]);
  figures.push(["decode ms", decodeMs === null ? "—" : decodeMs.toFixed(1)]);
  figures.push(["cached", String(item.cached)]);
  $("figures").tBodies[0].replaceChildren(...figures.map(([name, value]) => {
    const row = document.createElement("tr");
    row.dataset.figure = name;
    row.append(cell(name), cell(value));
    return row;
  }));
  link("download-json", new Blob([JSON.stringify(item)], { type: "application/json" }), "tokens.json");
  link("download-npy", npy(item.tokens, item.shape, model.vocab_size), "tokens.npy");
  $("download-media").hidden = !reconstruction;
  if (reconstruction) {
    const extension = model.modality === "image" ? "png" : "wav";
    link("download-media", reconstruction, `reconstruction.${extension}`);
  }
  $("results").hidden = false;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

function mediaElement(kind, blob) {
  const element = document.createElement(kind === "image" ? "img" : "audio");
  element.src = objectUrl(blob);
  if (kind === "audio") element.controls = true;
  return element;
}

function link(id, blob, name) {
  $(id).href = objectUrl(blob);
  $(id).download = name;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// ---- the token view: one pixel per token, coloured by id -------------------------------------

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colour(fraction) {
  const at = Math.min(Math.max(fraction, 0), 1) * (VIRIDIS.length - 1);
  const low = Math.floor(at);
  const high = Math.min(low + 1, VIRIDIS.length - 1);
  return VIRIDIS[low].map((c, i) => Math.round(c + (VIRIDIS[high][i] - c) * (at - low)));
}

function drawTokens(item, model) {
  const sequence = !Array.isArray(item.tokens[0]); // a one-dimensional image tokenizer's ids
  const rows = sequence ? [item.tokens] : item.tokens;
  const canvas = $("tokens");
  canvas.height = rows.length;
  canvas.width = rows[0].length;
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  rows.forEach((row, y) => row.forEach((id, x) => {
    const offset = 4 * (y * canvas.width + x);
    image.data.set([...colour(id / (model.vocab_size - 1)), 255], offset);
  }));
  context.putImageData(image, 0, 0);
  const audio = model.modality === "audio";
  const strip = audio || sequence;
  canvas.style.height = strip ? `${Math.max(rows.length * 14, 56)}px` : "";
  canvas.style.maxWidth = strip ? "" : "512px";
  $("tokens-caption").textContent = audio
    ? `tokens: ${rows.length} codebooks × ${rows[0].length} frames (colour: id)`
    : sequence
      ? `tokens: a sequence of ${rows[0].length} ids (colour: id)`
      : `tokens: ${rows.length} × ${rows[0].length} grid (colour: id)`;
}

// ---- .npy of the tokens, as the API's Accept: application/x-npy would answer -----------------

function npy(rows, shape, vocab) {
  const wide = vocab > 65536;
  let header = `{'descr': '${wide ? "<i4" : "<u2"}', 'fortran_order': False, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";
  const values = rows.flat(Infinity);
  const data = wide ? new Int32Array(values) : new Uint16Array(values);
  const preamble = new Uint8Array(10 + header.length);
  preamble.set([0x93, 78, 85, 77, 80, 89, 1, 0, header.length & 255, header.length >> 8]);
  preamble.set(new TextEncoder().encode(header), 10);
  return new Blob([preamble, data.buffer], { type: "application/octet-stream" });
}

// ---- image quality: the original as the model saw it, against the reconstruction -------------

async function rgbaOf(source, draw, width, height) {
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, width, height);
  context.imageSmoothingQuality = "high";
  draw(context, await createImageBitmap(source, { imageOrientation: "from-image" }));
  return context.getImageData(0, 0, width, height).data;
}

async function imageQuality(file, reconstruction, item, model) {
  const [height, width] = model.image_size;
  const [left, top, right, bottom] = item.crop_box;
  const [x0, y0, x1, y1] = item.content_box;
  const original = await rgbaOf(file, (c, bitmap) => c.drawImage(
    bitmap, left, top, right - left, bottom - top, x0, y0, x1 - x0, y1 - y0,
  ), width, height);
  const decoded = await rgbaOf(reconstruction, (c, bitmap) => c.drawImage(bitmap, 0, 0), width, height);
  let squared = 0;
  for (let i = 0; i < original.length; i += 4) {
    for (let c = 0; c < 3; c++) squared += (original[i + c] - decoded[i + c]) ** 2;
  }
  const mse = squared / (width * height * 3);
  return { psnr: 10 * Math.log10((255 * 255) / Math.max(mse, 1e-12)), ssim: ssim(original, decoded, width, height) };
}

function luma(rgba, count) {
  const y = new Float64Array(count);
  for (let i = 0; i < count; i++) y[i] = 0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2];
  return y;
}

// mean SSIM of the luma over 7 x 7 windows (the window of scikit-image's default)
function ssim(a, b, width, height, win = 7) {
  const x = luma(a, width * height);
  const y = luma(b, width * height);
  const c1 = (0.01 * 255) ** 2;
  const c2 = (0.03 * 255) ** 2;
  const n = win * win;
  let total = 0;
  let windows = 0;
  for (let top = 0; top + win <= height; top++) {
    for (let left = 0; left + win <= width; left++) {
      let sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
      for (let r = top; r < top + win; r++) {
        for (let c = left; c < left + win; c++) {
          const u = x[r * width + c];
          const v = y[r * width + c];
          sx += u; sy += v; sxx += u * u; syy += v * v; sxy += u * v;
        }
      }
      const mx = sx / n, my = sy / n;
      const vx = (sxx - n * mx * mx) / (n - 1), vy = (syy - n * my * my) / (n - 1);
      const cov = (sxy - n * mx * my) / (n - 1);
      total += ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
      windows++;
    }
  }
  return total / windows;
}

// ---- audio quality: both decoded at the model's rate, mixed to mono --------------------------

async function monoAt(blob, rate) {
  const context = new OfflineAudioContext(1, 1, rate);
  const buffer = await context.decodeAudioData(await blob.arrayBuffer());
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const channel = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / buffer.numberOfChannels;
  }
  return mono;
}

async function audioQuality(file, reconstruction, rate) {
  const original = await monoAt(file, rate);
  const decoded = await monoAt(reconstruction, rate);
  const length = Math.min(original.length, decoded.length);
  let signal = 0, noise = 0;
  for (let i = 0; i < length; i++) {
    signal += original[i] ** 2;
    noise += (original[i] - decoded[i]) ** 2;
  }
  return {
    snr: 10 * Math.log10(Math.max(signal, 1e-12) / Math.max(noise, 1e-12)),
    mel: melDistance(original.subarray(0, length), decoded.subarray(0, length), rate),
  };
}

// mean |log10 mel(a) - log10 mel(b)| over 80 bands, 1024-point frames every 256 samples
function melDistance(a, b, rate, size = 1024, hop = 256, bands = 80) {
  const filters = melFilters(size, rate, bands);
  const window = Float64Array.from({ length: size }, (_, i) => 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / size));
  let total = 0, count = 0;
  for (let start = 0; start + size <= a.length; start += hop) {
    const ma = melFrame(a, start, window, filters);
    const mb = melFrame(b, start, window, filters);
    for (let k = 0; k < bands; k++) total += Math.abs(ma[k] - mb[k]);
    count += bands;
  }
  return count ? total / count : 0;
}

function melFrame(signal, start, window, filters) {
  const size = window.length;
  const re = new Float64Array(size);
  const im = new Float64Array(size);
  for (let i = 0; i < size; i++) re[i] = signal[start + i] * window[i];
  fft(re, im);
  return filters.map((filter) => {
    let energy = 0;
    filter.forEach(([bin, weight]) => { energy += weight * (re[bin] ** 2 + im[bin] ** 2); });
    return Math.log10(Math.max(energy, 1e-10));
  });
}

function melFilters(size, rate, bands) {
  const mel = (hz) => 2595 * Math.log10(1 + hz / 700);
  const hz = (m) => 700 * (10 ** (m / 2595) - 1);
  const top = mel(rate / 2);
  const edges = Array.from({ length: bands + 2 }, (_, i) => hz((top * i) / (bands + 1)));
  const bins = edges.map((f) => (f * size) / rate);
  return Array.from({ length: bands }, (_, k) => {
    const filter = [];
    for (let bin = Math.floor(bins[k]); bin <= Math.ceil(bins[k + 2]) && bin <= size / 2; bin++) {
      const rise = (bin - bins[k]) / (bins[k + 1] - bins[k]);
      const fall = (bins[k + 2] - bin) / (bins[k + 2] - bins[k + 1]);
      const weight = Math.max(0, Math.min(rise, fall));
      if (weight > 0) filter.push([bin, weight]);
    }
    return filter;
  });
}

// in-place radix-2 FFT
function fft(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) { [re[i], re[j]] = [re[j], re[i]]; [im[i], im[j]] = [im[j], im[i]]; }
  }
  for (let len = 2; len <= n; len <<= 1) {
    const angle = (-2 * Math.PI) / len;
    for (let i = 0; i < n; i += len) {
      for (let k = 0; k < len / 2; k++) {
        const wr = Math.cos(angle * k), wi = Math.sin(angle * k);
        const a = i + k, b = a + len / 2;
        const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr; im[b] = im[a] - ti;
        re[a] += tr; im[a] += ti;
      }
    }
  }
}

// ---- the microphone: PCM from an AudioWorklet, written as a 16-bit WAV -----------------------

const TAP = `class Tap extends AudioWorkletProcessor {
  process(inputs) { const channel = inputs[0][0]; if (channel) this.port.postMessage(channel.slice(0)); return true; }
}
registerProcessor("tap", Tap);`;

let recording = null;

async function toggleRecording() {
  if (recording) {
    const { context, stream, chunks } = recording;
    recording = null;
    stream.getTracks().forEach((track) => track.stop());
    await context.close();
    $("record").classList.remove("on");
    $("record").textContent = "● record";
    choose(new File([wav(chunks, context.sampleRate)], "recording.wav", { type: "audio/wav" }));
    return;
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const context = new AudioContext();
  await context.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP], { type: "text/javascript" })));
  const tap = new AudioWorkletNode(context, "tap");
  const chunks = [];
  tap.port.onmessage = (event) => chunks.push(event.data);
  context.createMediaStreamSource(stream).connect(tap);
  recording = { context, stream, chunks };
  $("record").classList.add("on");
  $("record").textContent = "■ stop";
  setStatus("recording… press stop when done");
}

function wav(chunks, rate) {
  const samples = chunks.reduce((n, chunk) => n + chunk.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * samples));
  const text = (offset, value) => [...value].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * samples, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * samples, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (const value of chunk) {
      view.setInt16(offset, Math.max(-1, Math.min(1, value)) * 32767, true);
      offset += 2;
    }
  }
  return view.buffer;
}

// ---- wiring ----------------------------------------------------------------------------------

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", () => { if ($("file").files[0]) choose($("file").files[0]); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) choose(event.dataTransfer.files[0]);
  });
  $("record").addEventListener("click", () => toggleRecording().catch((e) => setStatus(e.message, true)));
  $("model").addEventListener("change", fillCodebooks);
  $("options").addEventListener("submit", (event) => { event.preventDefault(); run(); });
  $("key-save").addEventListener("click", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value);
    $("key-panel").hidden = true;
    loadModels().then(() => setStatus("key accepted"), (e) => setStatus(e.message, true));
  });
}

wire();
loadModels().catch((error) => setStatus(error.message, true));
