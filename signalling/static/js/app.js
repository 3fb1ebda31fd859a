// The page: pick and load a pipeline, choose an input, start a stream, play with its settings.
// Pipelines' settings come from /api/v1/pipelines/schemas (see schema.js); nothing here names a
// pipeline.

import { api } from "./api.js";
import { el, renderField, renderPrompts } from "./controls.js";
import { ModelsPanel } from "./downloads.js";
import { LatencyChart } from "./latency.js";
import { OutputPanel } from "./outputs.js";
import { ParamQueue } from "./params.js";
import { categoryTitle, fieldsOf, groupByCategory, transitionOf } from "./schema.js";
import { InputPanel, stopStream } from "./sources.js";
import { Backoff, Stream } from "./stream.js";

const STATUS_POLL_LOADING_MS = 500;
const STATUS_POLL_IDLE_MS = 3000;
const STABLE_STREAM_MS = 10000; // a stream this old resets the reconnect backoff
const LOAD_TIMEOUT_MS = 10 * 60 * 1000;
const SCHEMAS_RETRY_MS = 3000;

const $ = (id) => document.getElementById(id);
const ui = {
  pipelinePill: $("pipeline-pill"),
  streamPill: $("stream-pill"),
  screen: $("screen"),
  output: $("output"),
  placeholderText: $("placeholder-text"),
  preview: $("input-preview"),
  latency: $("latency"),
  outputs: $("outputs"),
  alert: $("alert"),
  alertText: $("alert-text"),
  alertClose: $("alert-close"),
  start: $("start"),
  fps: $("readout-fps"),
  size: $("readout-size"),
  rtt: $("readout-rtt"),
  streamStatus: $("stream-status"),
  pipelineSelect: $("pipeline-select"),
  pipelineDescription: $("pipeline-description"),
  models: $("models"),
  modelsText: $("models-text"),
  download: $("download"),
  downloadProgress: $("download-progress"),
  downloadBar: $("download-bar"),
  downloadDetail: $("download-detail"),
  loadSettings: $("load-settings"),
  loadFields: $("load-fields"),
  load: $("load"),
  loadStatus: $("load-status"),
  sourceGroup: $("source-group"),
  cameraField: $("camera-field"),
  cameraSelect: $("camera-select"),
  fileField: $("file-field"),
  fileInput: $("file-input"),
  sourceHint: $("source-hint"),
  settings: $("settings"),
};

const state = {
  pipelines: {}, // id -> entry of /api/v1/pipelines/schemas
  selected: null,
  fields: [],
  values: {}, // id -> {key: value} (runtime and load-time)
  promptState: {}, // id -> {prompts, transitionSteps}
  controls: [], // {field, control}
  server: { status: "not_loaded" },
  loadRequested: false,
  phase: "idle", // idle | starting | live | reconnecting
  stream: null,
  input: null,
  backoff: new Backoff(),
  reconnectTimer: null,
  countdownTimer: null,
  stableTimer: null,
  statusTimer: null,
};

const params = new ParamQueue((patch) => Boolean(state.stream && state.stream.send(patch)));
const models = new ModelsPanel(ui, (text) => showAlert(text));
const inputs = new InputPanel(ui, () => changeInput());
const latency = new LatencyChart(ui.latency);
const outputs = new OutputPanel(ui.outputs);

// ------------------------------------------------------------------ alerts and status text

function showAlert(text, kind = "error") {
  ui.alertText.textContent = text;
  ui.alert.dataset.kind = kind;
  ui.alert.hidden = false;
}

function clearAlert() {
  ui.alert.hidden = true;
  ui.alertText.textContent = "";
}

ui.alertClose.addEventListener("click", clearAlert);

function setStreamStatus(text) {
  ui.streamStatus.textContent = text;
}

function setPhase(phase) {
  state.phase = phase;
  ui.screen.dataset.state = phase;
  ui.streamPill.dataset.state = phase;
  ui.streamPill.textContent = { idle: "idle", starting: "connecting", live: "live", reconnecting: "reconnecting" }[phase];
  refreshButtons();
}

// ------------------------------------------------------------------ pipelines

function selectedPipeline() {
  return state.pipelines[state.selected];
}

function loadParamsOf(id) {
  const values = state.values[id] || {};
  const out = {};
  for (const f of fieldsOf(state.pipelines[id])) if (f.load) out[f.key] = values[f.key];
  return out;
}

function runtimeParams(id) {
  const values = state.values[id] || {};
  const out = {};
  for (const f of fieldsOf(state.pipelines[id])) {
    if (f.load) continue;
    if (f.widget === "prompts") {
      const prompts = activePrompts(id);
      if (prompts.length) out[f.key] = prompts;
    } else {
      out[f.key] = values[f.key];
    }
  }
  return out;
}

function activePrompts(id) {
  const ps = state.promptState[id];
  if (!ps) return [];
  return ps.prompts.filter((p) => p.text.trim()).map((p) => ({ text: p.text, weight: p.weight }));
}

function isLoaded(id) {
  const s = state.server;
  if (s.status !== "loaded" || s.pipeline_id !== id) return false;
  const want = loadParamsOf(id);
  const have = s.load_params || {};
  const fields = fieldsOf(state.pipelines[id]);
  return fields
    .filter((f) => f.load)
    .every((f) => JSON.stringify(have[f.key] ?? f.default) === JSON.stringify(want[f.key]));
}

function modesOf(id) {
  const p = state.pipelines[id];
  return (p && p.supported_modes) || ["video"];
}

/** Read every pipeline's schema; false (and the reason shown) when the server did not answer. */
async function loadSchemas() {
  let body;
  try {
    body = await api.schemas();
  } catch (err) {
    showAlert(`Could not read the pipelines: ${err.message}. Trying again…`);
    return false;
  }
  clearAlert();
  state.pipelines = body.pipelines || {};
  ui.pipelineSelect.replaceChildren();
  for (const [id, p] of Object.entries(state.pipelines)) {
    ui.pipelineSelect.append(el("option", { value: id, text: p.name || id }));
    const values = {};
    for (const f of fieldsOf(p)) values[f.key] = structuredClone(f.default);
    state.values[id] = values;
    const promptField = fieldsOf(p).find((f) => f.widget === "prompts");
    if (promptField) {
      const tr = transitionOf(p);
      state.promptState[id] = {
        prompts: structuredClone(promptField.default),
        transitionSteps: 0,
        hasTransition: Boolean(tr),
      };
    }
  }
  return true;
}

function pickInitialPipeline() {
  const ids = Object.keys(state.pipelines);
  const remembered = localStorage.getItem("dreamwire.pipeline");
  const loaded = state.server.pipeline_id;
  const easy = ids.find((id) => !state.pipelines[id].requires_models && modesOf(id).includes("video"));
  return [loaded, remembered, easy, ids[0]].find((id) => id && state.pipelines[id]) || null;
}

function selectPipeline(id) {
  state.selected = id;
  ui.pipelineSelect.value = id || "";
  if (!id) return;
  localStorage.setItem("dreamwire.pipeline", id);
  const p = selectedPipeline();
  ui.pipelineDescription.textContent = p.description || "";
  state.fields = fieldsOf(p);
  renderSettings();
  inputs.setModes(modesOf(id));
  models.show(id, p);
  renderStatus();
}

function renderSettings() {
  const id = state.selected;
  const values = state.values[id];
  state.controls = [];
  ui.loadFields.replaceChildren();
  ui.settings.replaceChildren();

  const loadFields = state.fields.filter((f) => f.load);
  ui.loadSettings.hidden = loadFields.length === 0;
  for (const field of loadFields) {
    const control = renderField(field, values[field.key], (v) => {
      values[field.key] = v;
      refreshButtons();
    });
    state.controls.push({ field, control });
    ui.loadFields.append(control.element);
  }

  const runtime = state.fields.filter((f) => !f.load);
  for (const [category, fields] of groupByCategory(runtime)) {
    const card = el("section", { class: "card", "data-category": category });
    card.append(el("h2", { class: "card-title", text: categoryTitle(category) }));
    const body = el("div", { class: "fields" });
    for (const field of fields) {
      let control;
      if (field.widget === "prompts") {
        const ps = state.promptState[id];
        const tr = transitionOf(selectedPipeline());
        control = renderPrompts(field, ps, tr, (_value, delay) => sendPrompts(delay));
      } else {
        control = renderField(field, values[field.key], (v, delay) => {
          values[field.key] = v;
          queueParams({ [field.key]: v }, delay);
        });
      }
      state.controls.push({ field, control });
      body.append(control.element);
    }
    card.append(body);
    ui.settings.append(card);
  }
  refreshButtons();
}

function sendPrompts(delay) {
  const id = state.selected;
  const ps = state.promptState[id];
  const prompts = activePrompts(id);
  if (!prompts.length) return;
  if (ps.hasTransition && ps.transitionSteps > 0) {
    const method = state.values[id].prompt_interpolation_method;
    queueParams(
      {
        transition: {
          target_prompts: prompts,
          num_steps: ps.transitionSteps,
          ...(method ? { temporal_interpolation_method: method } : {}),
        },
      },
      delay,
    );
  } else {
    queueParams({ prompts }, delay);
  }
}

// ------------------------------------------------------------------ parameters over the data channel

/** Send a change now-ish while streaming; otherwise it goes as initialParameters at Start. */
function queueParams(patch, delayMs) {
  if (state.phase === "live" || state.phase === "starting") params.queue(patch, delayMs);
}

// ------------------------------------------------------------------ server status and loading

async function refreshStatus() {
  try {
    state.server = await api.status();
  } catch (err) {
    state.server = { status: "unreachable", error: err.message };
  }
  renderStatus();
  return state.server;
}

function scheduleStatusPoll() {
  clearTimeout(state.statusTimer);
  const interval = state.server.status === "loading" ? STATUS_POLL_LOADING_MS : STATUS_POLL_IDLE_MS;
  state.statusTimer = setTimeout(async () => {
    await refreshStatus();
    scheduleStatusPoll();
  }, interval);
}

function renderStatus() {
  const s = state.server;
  const name = s.pipeline_id ? (state.pipelines[s.pipeline_id]?.name ?? s.pipeline_id) : "";
  ui.pipelinePill.dataset.state = s.status;
  ui.pipelinePill.textContent =
    s.status === "not_loaded"
      ? "no pipeline"
      : s.status === "unreachable"
        ? "server unreachable"
        : s.status === "loaded"
          ? name
          : `${name} · ${s.status}`;
  ui.pipelinePill.title = `Server: ${s.status}`;
  const mine = s.pipeline_id === state.selected;
  let text = "";
  if (s.status === "loading" && mine) text = "Loading…";
  else if (s.status === "loaded" && mine) text = isLoaded(state.selected) ? "Loaded" : "Loaded with other load settings";
  else if (s.status === "error" && mine) text = `Failed to load: ${s.error || "unknown error"}`;
  else if (s.status === "loaded" && s.pipeline_id) text = `The server runs ${name}`;
  else if (s.status === "unreachable") text = `Server unreachable: ${s.error}`;
  ui.loadStatus.textContent = text;
  ui.loadStatus.dataset.state = mine ? s.status : "";
  refreshButtons();
}

/** Load the selected pipeline (unless it is loaded as wanted) and wait; throws the error text. */
async function ensureLoaded(id, { force = false } = {}) {
  if (!force && isLoaded(id)) return;
  await api.load(id, loadParamsOf(id));
  state.server = { status: "loading", pipeline_id: id };
  renderStatus();
  await waitLoaded(id);
}

async function waitLoaded(id) {
  const deadline = performance.now() + LOAD_TIMEOUT_MS;
  for (;;) {
    const s = await refreshStatus();
    if (s.status === "loaded" && s.pipeline_id === id) return;
    if (s.status === "error") throw new Error(`loading ${id} failed: ${s.error || "unknown error"}`);
    if (s.status !== "loading") throw new Error(`loading ${id} did not finish (status ${s.status})`);
    if (performance.now() > deadline) throw new Error(`loading ${id} takes too long`);
    await new Promise((resolve) => setTimeout(resolve, STATUS_POLL_LOADING_MS));
  }
}

ui.load.addEventListener("click", async () => {
  const id = state.selected;
  state.loadRequested = true;
  clearAlert();
  refreshButtons();
  try {
    await ensureLoaded(id, { force: true });
  } catch (err) {
    showAlert(err.message);
  } finally {
    state.loadRequested = false;
    refreshButtons();
    scheduleStatusPoll();
  }
});

// ------------------------------------------------------------------ input

function openInput() {
  const p = state.pipelines[state.server.pipeline_id] || selectedPipeline();
  return inputs.open(p.default_width || 512, p.default_height || 512);
}

function closeInput() {
  inputs.close(state.input);
  state.input = null;
}

/** While streaming: swap the video track in place, or restart when the mode changes. */
async function changeInput() {
  if (state.phase !== "live" || !state.stream) return;
  const nowVideo = inputs.source !== "none";
  if (Boolean(state.input) !== nowVideo) {
    await restart();
    return;
  }
  if (!nowVideo) return;
  try {
    const next = await openInput();
    const sender = state.stream.pc.getSenders().find((s) => s.track && s.track.kind === "video");
    await sender.replaceTrack(next.getVideoTracks()[0]);
    const old = state.input;
    state.input = next;
    if (old !== next) stopStream(old);
    inputs.showPreview(next);
  } catch (err) {
    showAlert(`Could not switch the input: ${err.message}`);
  }
}

// ------------------------------------------------------------------ streaming

async function connect() {
  const id = state.selected;
  await ensureLoaded(id);
  if (state.phase === "idle") return;
  if (!state.input && inputs.source !== "none") {
    state.input = await openInput();
    if (state.phase === "idle") {
      closeInput();
      return;
    }
  }
  inputs.showPreview(state.input);
  const stream = new Stream({ inputStream: state.input, initialParameters: runtimeParams(id) });
  state.stream = stream;
  params.clear();
  wireStream(stream);
  setStreamStatus("Connecting…");
  await stream.open();
  if (stream === state.stream && stream.sessionId) latency.start(stream.sessionId);
}

function wireStream(stream) {
  stream.addEventListener("track", (e) => {
    ui.output.srcObject = e.detail.stream;
  });
  stream.addEventListener("channelopen", () => params.flush());
  stream.addEventListener("message", (e) => onServerMessage(e.detail.data));
  stream.addEventListener("stats", (e) => {
    if (stream !== state.stream) return;
    const { fps, rttMs } = e.detail;
    ui.fps.textContent = fps === null ? "–" : fps.toFixed(1);
    const w = ui.output.videoWidth || e.detail.width;
    const h = ui.output.videoHeight || e.detail.height;
    ui.size.textContent = w && h ? `${w}×${h}` : "–";
    ui.rtt.textContent = rttMs === null || rttMs === undefined ? "–" : `${Math.round(rttMs)} ms`;
  });
  stream.addEventListener("state", (e) => {
    if (stream !== state.stream) return;
    if (e.detail.state === "connected") goLive();
    else if (state.phase !== "live") setStreamStatus(`Connecting… (${e.detail.state})`);
  });
  stream.addEventListener("ended", (e) => {
    if (stream !== state.stream) return;
    onStreamEnded(e.detail.reason, e.detail.fromServer);
  });
}

function onServerMessage(data) {
  if (!data || typeof data !== "object") return;
  switch (data.type) {
    case "error":
      showAlert(`Server: ${typeof data.data === "string" ? data.data : JSON.stringify(data.data)}`, "warning");
      break;
    case "warning":
      showAlert(`Server: ${data.data}`, "warning");
      break;
    case "stream_stopped":
      // handled by the Stream's "ended"
      break;
    case "fetch_output":
      outputs.show(data.data);
      break;
    default:
      break;
  }
}

/** Connected (the first frame may still be on its way: a paused pipeline sends none). */
function goLive() {
  if (state.phase !== "starting" && state.phase !== "reconnecting") return;
  setPhase("live");
  setStreamStatus("");
  clearTimeout(state.stableTimer);
  state.stableTimer = setTimeout(() => state.backoff.reset(), STABLE_STREAM_MS);
}

ui.output.addEventListener("playing", goLive);

async function start() {
  clearAlert();
  state.backoff.reset();
  setPhase("starting");
  try {
    await connect();
  } catch (err) {
    if (state.phase === "idle") return;
    showAlert(`Could not start: ${err.message}`);
    await teardown();
  }
}

async function teardown() {
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdownTimer);
  clearTimeout(state.stableTimer);
  params.clear();
  latency.stop();
  outputs.clear();
  const stream = state.stream;
  state.stream = null;
  if (stream) await stream.close();
  closeInput();
  ui.output.srcObject = null;
  ui.fps.textContent = ui.size.textContent = ui.rtt.textContent = "–";
  setStreamStatus("");
  setPhase("idle");
}

async function restart() {
  await teardown();
  await start();
}

function onStreamEnded(reason, fromServer) {
  showAlert(`Stream stopped: ${reason}`);
  latency.stop();
  outputs.clear();
  const stream = state.stream;
  state.stream = null;
  // A session the server stopped is gone there already: no DELETE for it.
  if (stream) stream.close({ tellServer: !fromServer });
  ui.output.srcObject = null;
  clearTimeout(state.stableTimer);
  scheduleReconnect();
}

/** Try again after the next backoff delay, counting down in the status line. */
function scheduleReconnect(why = "") {
  const delay = state.backoff.next();
  setPhase("reconnecting");
  const due = performance.now() + delay;
  const tick = () => {
    const left = Math.max(0, Math.ceil((due - performance.now()) / 1000));
    setStreamStatus(`${why} Reconnecting in ${left} s (attempt ${state.backoff.attempt})…`.trim());
  };
  tick();
  clearInterval(state.countdownTimer);
  state.countdownTimer = setInterval(tick, 250);
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(reconnect, delay);
}

async function reconnect() {
  clearInterval(state.countdownTimer);
  if (state.phase !== "reconnecting") return;
  setStreamStatus(`Reconnecting (attempt ${state.backoff.attempt})…`);
  try {
    const s = await refreshStatus();
    if (s.status === "loaded" && s.pipeline_id !== state.selected) {
      throw new Error(`the server now runs ${s.pipeline_id}`);
    }
    if (s.status === "loading") await waitLoaded(state.selected);
    await connect();
  } catch (err) {
    if (state.phase !== "reconnecting") return;
    const stream = state.stream;
    state.stream = null;
    if (stream) stream.close();
    console.warn("reconnect failed:", err.message);
    scheduleReconnect(`Reconnect failed (${err.message}).`);
  }
}

ui.start.addEventListener("click", () => {
  if (state.phase === "idle") start();
  else teardown();
});

// ------------------------------------------------------------------ buttons and disabled states

function refreshButtons() {
  const id = state.selected;
  const streaming = state.phase !== "idle";
  const loading = state.loadRequested || (state.server.status === "loading" && state.server.pipeline_id === id);
  ui.pipelineSelect.disabled = streaming || loading;
  ui.load.disabled = !id || streaming || loading;
  ui.load.textContent = loading
    ? "Loading…"
    : state.server.pipeline_id === id && state.server.status === "loaded"
      ? isLoaded(id) ? "Reload" : "Reload with these settings"
      : "Load";
  ui.load.classList.toggle("busy", loading);
  ui.start.disabled = !id || (loading && !streaming);
  ui.start.classList.toggle("stop", streaming);
  ui.start.querySelector(".button-label").textContent = streaming ? "Stop" : "Start";
  ui.start.querySelector(".button-icon").textContent = streaming ? "■" : "▶";
  for (const { field, control } of state.controls) {
    control.setDisabled(field.load && (streaming || loading));
  }
  const p = selectedPipeline();
  if (!streaming) {
    ui.placeholderText.textContent = !p
      ? "No pipelines are available."
      : isLoaded(id)
        ? `${p.name} is loaded. Press Start.`
        : loading
          ? `Loading ${p.name}…`
          : `Load ${p.name}, or just press Start.`;
  } else if (state.phase === "starting") {
    ui.placeholderText.textContent = "Connecting…";
  } else if (state.phase === "reconnecting") {
    ui.placeholderText.textContent = "Reconnecting…";
  }
}

ui.pipelineSelect.addEventListener("change", () => selectPipeline(ui.pipelineSelect.value));

// ------------------------------------------------------------------ start-up

async function main() {
  setPhase("idle");
  while (!(await loadSchemas())) await new Promise((resolve) => setTimeout(resolve, SCHEMAS_RETRY_MS));
  await refreshStatus();
  selectPipeline(pickInitialPipeline());
  renderStatus();
  scheduleStatusPoll();
  inputs.refreshCameras();
  document.body.dataset.ready = "true";
}

window.addEventListener("pagehide", () => {
  if (state.stream) state.stream.close();
});

main();
