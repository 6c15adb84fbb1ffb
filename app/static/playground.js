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
  $("live").hidden = !state.models.some((m) => m.streaming);
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
  // the server measures the reconstruction against what the model was given
  if (!model.encode_only) query.set("report", "true");
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
    show(model, encoded, item, reconstruction, encodeMs, decodeMs);
    setStatus(model.encode_only ? "done (encode-only model: no reconstruction)" : "done");
    document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("run").disabled = false;
  }
}

function show(model, encoded, item, reconstruction, encodeMs, decodeMs) {
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
    figures.push(["resize filter", item.resize_filter]);
    if (item.quality) {
      figures.push(["PSNR dB", item.quality.psnr_db.toFixed(2)], ["SSIM", item.quality.ssim.toFixed(4)]);
    }
  } else {
    // one token per row of the token array and frame (codebooks at several rates fill more rows)
    const kbps = (bits * item.shape[0] * item.frame_rate) / 1000;
    figures.push(["kbit/s", kbps.toFixed(3)]);
    figures.push(["duration s", String(item.duration_s)]);
    figures.push(["source", `${item.source_sample_rate} Hz × ${item.source_channels} ch`]);
    const done = [item.resampled && "resampled", item.downmixed && "downmixed to mono"];
    figures.push(["preprocessing", done.filter(Boolean).join(", ") || "none"]);
    if (item.quality) {
      figures.push(
        ["SNR dB", item.quality.snr_db.toFixed(2)],
        ["mel distance", item.quality.mel_distance.toFixed(4)],
      );
    }
  }
  // the report's decode and measurement run inside the encode request
  figures.push([item.quality ? "encode + report ms" : "encode ms", encodeMs.toFixed(1)]);
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

// ---- live: the microphone streamed to a causal codec, its tokens decoded and played back -----
// docs/streaming.md: AUDIO 0x01, TOKENS 0x02 (u32 first frame, u16 rows, u16 frames, ids),
// END 0x03, ERROR 0x04. An encode's TOKENS message is what the decode stream takes, as is.

let live = null;

function liveModel() {
  return state.models.find((m) => m.name === $("model").value && m.streaming)
    || state.models.find((m) => m.streaming);
}

function openSocket(op, model, encoding) {
  const url = new URL(`/v1/audio/stream/${op}`, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = new URLSearchParams({ model: model.name, encoding }).toString();
  const key = sessionStorage.getItem(KEY_STORE);
  const ws = new WebSocket(url, key ? ["tokserve.v1", `key.${key}`] : []);
  ws.binaryType = "arraybuffer";
  return new Promise((resolve, reject) => {
    ws.onopen = () => resolve(ws);
    ws.onerror = () => reject(new Error(`the ${op} stream could not open`));
  });
}

function streamError(event) {
  const bytes = new Uint8Array(event.data);
  return bytes[0] === 4 ? JSON.parse(new TextDecoder().decode(bytes.slice(1))).detail : null;
}

async function toggleLive() {
  if (live) {
    live.stop();
    return;
  }
  const model = liveModel();
  const media = await navigator.mediaDevices.getUserMedia({ audio: true });
  const context = new AudioContext({ sampleRate: model.sample_rate });
  await context.audioWorklet.addModule(URL.createObjectURL(new Blob([TAP], { type: "text/javascript" })));
  const [encoder, decoder] = await Promise.all([
    openSocket("encode", model, "pcm_s16le"), openSocket("decode", model, "pcm_f32le"),
  ]);
  const tap = new AudioWorkletNode(context, "tap");
  const counts = { encoded: 0, played: 0 };
  let playAt = 0;
  const show = () => setStatus(`live with ${model.name}: ${counts.encoded} frames encoded, ${counts.played} frames played`);
  tap.port.onmessage = (event) => {
    if (encoder.readyState !== WebSocket.OPEN) return;
    const message = new DataView(new ArrayBuffer(1 + 2 * event.data.length));
    message.setUint8(0, 1);
    event.data.forEach((value, i) => message.setInt16(1 + 2 * i, Math.max(-1, Math.min(1, value)) * 32767, true));
    encoder.send(message.buffer);
  };
  encoder.onmessage = (event) => {
    const kind = new Uint8Array(event.data)[0];
    if (kind === 2) {
      counts.encoded += new DataView(event.data).getUint16(7, true);
      decoder.send(event.data);
    } else if (kind === 3) {
      decoder.send(new Uint8Array([3]));
    } else if (kind === 4) {
      setStatus(streamError(event), true);
    }
    show();
  };
  decoder.onmessage = (event) => {
    const kind = new Uint8Array(event.data)[0];
    if (kind === 1) {
      const interleaved = new Float32Array(event.data.slice(1));
      const samples = interleaved.filter((_, i) => i % model.channels === 0);
      const buffer = context.createBuffer(1, samples.length, model.sample_rate);
      buffer.copyToChannel(samples, 0);
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(context.destination);
      playAt = Math.max(playAt, context.currentTime);
      source.start(playAt);
      playAt += buffer.duration;
      counts.played += samples.length / model.hop_length;
      show();
    } else if (kind === 3) {
      const left = Math.max(0, playAt - context.currentTime);
      setTimeout(() => context.close(), 1000 * left + 100);
      show();
      document.body.dataset.live = "done";
    } else if (kind === 4) {
      setStatus(streamError(event), true);
    }
  };
  context.createMediaStreamSource(media).connect(tap);
  live = {
    stop() {
      live = null;
      tap.disconnect();
      media.getTracks().forEach((track) => track.stop());
      if (encoder.readyState === WebSocket.OPEN) encoder.send(new Uint8Array([3]));
      $("live").classList.remove("on");
      $("live").textContent = "◉ live";
    },
  };
  document.body.dataset.live = "on";
  $("live").classList.add("on");
  $("live").textContent = "■ stop live";
  show();
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
  $("live").addEventListener("click", () => toggleLive().catch((e) => setStatus(e.message, true)));
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
