// Masklet console: pick a stream, watch its masks, prompt objects. Plain JS, no build step.
// The token lives in sessionStorage (this tab only) and travels only in the Authorization header,
// which is why frames are fetched (not <img src>) and records polled (EventSource cannot send it).
"use strict";

const TOKEN_KEY = "masklet-token";
const FRAME_POLL_MS = 250;
const STATUS_POLL_MS = 1000;
const DRAG_THRESHOLD_PX = 5;
// Same palette as pipeline/sinks.py PALETTE, so swatches match the overlay.
const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180],
  [70, 240, 240], [245, 130, 48], [240, 50, 230], [210, 245, 60], [0, 128, 128]];

const $ = (id) => document.getElementById(id);
const state = { stream: null, frameIdx: null, revision: null, frameShown: false, selected: null, drag: null, busy: false };

function showStatus(text) { $("status").textContent = text || ""; }

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({ Authorization: `Bearer ${token}` }, options.headers || {});
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken("Token rejected; enter it again.");
    throw new Error("unauthorized");
  }
  return response;
}

async function errorText(response) {
  try { const body = await response.json(); return body.detail || response.statusText; }
  catch (e) { return response.statusText; }
}

function askForToken(message) {
  $("console").hidden = true;
  $("token-form").hidden = false;
  showStatus(message || "");
  $("token").focus();
}

// -- streams --------------------------------------------------------------------------------

async function refreshStreams() {
  const response = await api("/streams");
  if (!response.ok) { showStatus(await errorText(response)); return; }
  const streams = await response.json();
  const select = $("stream");
  const ids = streams.map((s) => s.stream_id);
  if (select.options.length !== ids.length || ids.some((id, i) => select.options[i].value !== id)) {
    select.innerHTML = "";
    for (const s of streams) {
      const option = document.createElement("option");
      option.value = s.stream_id;
      option.textContent = `${s.stream_id} (${s.state})`;
      select.appendChild(option);
    }
  }
  if (!ids.includes(state.stream)) selectStream(ids.length ? ids[0] : null);
  else select.value = state.stream;
}

function selectStream(id) {
  state.stream = id;
  state.selected = null;
  state.frameIdx = null;
  state.revision = null;
  state.frameShown = false;
  $("stream").value = id || "";
  $("objects").innerHTML = "";
}

// -- frames ---------------------------------------------------------------------------------

async function refreshFrame() {
  const stream = state.stream;
  if (!stream) return;
  // JPEG: a fifth of PNG's encoding time on the server and a sixth of its bytes (deploy/overlays.py).
  const response = await api(`/streams/${encodeURIComponent(stream)}/frame.jpg`);
  if (response.status !== 200) { $("frame-info").textContent = "waiting for the first frame..."; return; }
  const frameIdx = Number(response.headers.get("X-Frame-Index"));
  const revision = Number(response.headers.get("X-Revision") || 0);
  // A frame's picture changes only with a revision of its record (a late prompt reached it).
  // (The browser revalidates with the picture's ETag, so an unchanged one comes back as 304, no body.)
  if (state.frameShown && frameIdx === state.frameIdx && revision === state.revision) {
    if (response.body) await response.body.cancel();  // an unread body would hold its connection
    return;
  }
  // Decode off-screen, then draw in one step: the canvas always holds a whole frame, so its size
  // (the video's size) is known at every click. An <img> whose src is swapped reports
  // naturalWidth 0 until the new frame decodes, and a click in that window used to be lost.
  const bitmap = await createImageBitmap(await response.blob());
  if (stream !== state.stream) { bitmap.close(); return; }  // the user switched streams meanwhile
  const canvas = $("frame");
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  state.frameIdx = frameIdx;
  state.revision = revision;
  state.frameShown = true;
  canvas.dataset.frameIdx = String(frameIdx);
  $("frame-info").textContent = `frame ${frameIdx}`;
}

// -- objects --------------------------------------------------------------------------------

async function refreshObjects() {
  if (!state.stream) return;
  const id = encodeURIComponent(state.stream);
  const [statusResponse, recordResponse] = await Promise.all([api(`/streams/${id}`), api(`/streams/${id}/masklet`)]);
  if (!statusResponse.ok) return;
  const status = await statusResponse.json();
  const record = recordResponse.status === 200 ? await recordResponse.json() : { objects: [] };
  const inRecord = new Map(record.objects.map((o) => [o.object_id, o]));
  const ids = new Set([...Object.keys(status.objects).map(Number), ...inRecord.keys()]);
  const list = $("objects");
  list.innerHTML = "";
  for (const objectId of [...ids].sort((a, b) => a - b)) {
    const seen = inRecord.get(objectId);
    const score = status.objects[objectId] !== undefined ? status.objects[objectId] : seen && seen.score;
    const li = document.createElement("li");
    li.dataset.objectId = String(objectId);
    li.dataset.area = String(seen ? seen.area : 0);
    li.dataset.present = String(Boolean(seen && seen.present));
    li.className = (objectId === state.selected ? "selected " : "") + (seen && seen.present ? "present" : "absent");
    const [r, g, b] = PALETTE[objectId % PALETTE.length];
    li.innerHTML = `<span class="swatch" style="background: rgb(${r},${g},${b})"></span>
      <span>#${objectId}</span><span class="area">${seen ? seen.area : 0} px</span>
      <span class="score" title="presence score (logit)">${score === undefined ? "-" : Number(score).toFixed(2)}</span>
      <button type="button" class="remove" title="remove object">&times;</button>`;
    li.addEventListener("click", () => { state.selected = objectId; refreshObjects(); });
    li.querySelector(".remove").addEventListener("click", (event) => { event.stopPropagation(); removeObject(objectId); });
    list.appendChild(li);
  }
  $("frame-info").textContent = `frame ${state.frameIdx ?? "-"} · ${status.fps.toFixed(1)} fps · ` +
    `${status.frames_published} done · ${status.frames_dropped} dropped · lag ${status.lag_frames}`;
}

async function sendPrompt(path, body) {
  if (state.busy) return;
  state.busy = true;
  try {
    if (state.frameIdx !== null) body.frame_idx = state.frameIdx;
    const response = await api(path, { method: "POST", json: body });
    if (!response.ok) { showStatus(`prompt refused: ${await errorText(response)}`); return; }
    const accepted = await response.json();
    state.selected = accepted.object_id;
    showStatus(`${accepted.action} object ${accepted.object_id} at frame ${accepted.frame_idx}`);
    refreshObjects();
  } finally { state.busy = false; }
}

function addPoint(x, y, positive) {
  const stream = encodeURIComponent(state.stream);
  const body = { points: [[x, y]], labels: [positive ? 1 : 0] };
  if (state.selected === null) sendPrompt(`/streams/${stream}/objects`, body);
  else sendPrompt(`/streams/${stream}/objects/${state.selected}/refine`, body);
}

function addBox(x0, y0, x1, y1) {
  sendPrompt(`/streams/${encodeURIComponent(state.stream)}/objects`, { box: [x0, y0, x1, y1] });
}

async function removeObject(objectId) {
  const response = await api(`/streams/${encodeURIComponent(state.stream)}/objects/${objectId}`, { method: "DELETE" });
  if (!response.ok) showStatus(`remove refused: ${await errorText(response)}`);
  if (state.selected === objectId) state.selected = null;
  refreshObjects();
}

// -- pointer: click = point, shift+click = negative point, drag = box ----------------------------

function videoCoords(event) {
  const canvas = $("frame");
  const rect = canvas.getBoundingClientRect();
  const sx = canvas.width / rect.width, sy = canvas.height / rect.height;
  const cx = Math.min(Math.max(event.clientX - rect.left, 0), rect.width - 1);
  const cy = Math.min(Math.max(event.clientY - rect.top, 0), rect.height - 1);
  return { x: cx * sx, y: cy * sy, cx, cy };
}

function onPointerDown(event) {
  if (!state.stream || !state.frameShown) return;
  event.preventDefault();
  state.drag = Object.assign(videoCoords(event), { shift: event.shiftKey });
}

function onPointerMove(event) {
  if (!state.drag) return;
  const now = videoCoords(event), box = $("drag-box");
  if (Math.hypot(now.cx - state.drag.cx, now.cy - state.drag.cy) < DRAG_THRESHOLD_PX) { box.hidden = true; return; }
  Object.assign(box.style, { left: `${Math.min(now.cx, state.drag.cx)}px`, top: `${Math.min(now.cy, state.drag.cy)}px`,
    width: `${Math.abs(now.cx - state.drag.cx)}px`, height: `${Math.abs(now.cy - state.drag.cy)}px` });
  box.hidden = false;
}

function onPointerUp(event) {
  if (!state.drag) return;
  const start = state.drag, end = videoCoords(event);
  state.drag = null;
  $("drag-box").hidden = true;
  if (Math.hypot(end.cx - start.cx, end.cy - start.cy) < DRAG_THRESHOLD_PX) {
    addPoint(Math.round(start.x), Math.round(start.y), !(start.shift || event.shiftKey));
  } else {
    addBox(Math.round(Math.min(start.x, end.x)), Math.round(Math.min(start.y, end.y)),
      Math.round(Math.max(start.x, end.x)), Math.round(Math.max(start.y, end.y)));
  }
}

// -- start ----------------------------------------------------------------------------------

function loop(fn, ms) {
  const tick = async () => {
    if (!$("console").hidden) { try { await fn(); } catch (e) { if (e.message !== "unauthorized") showStatus(String(e)); } }
    setTimeout(tick, ms);
  };
  tick();
}

async function createStream(event) {
  event.preventDefault();
  const response = await api("/streams", { method: "POST",
    json: { stream_id: $("new-stream-id").value, source: $("new-stream-source").value } });
  if (!response.ok) { showStatus(`stream refused: ${await errorText(response)}`); return; }
  selectStream((await response.json()).stream_id);
  refreshStreams();
}

function start() {
  $("console").hidden = false;
  $("token-form").hidden = true;
  showStatus("");
}

window.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("stream").addEventListener("change", (event) => selectStream(event.target.value));
  $("new-object").addEventListener("click", () => { state.selected = null; refreshObjects(); });
  $("stream-form").addEventListener("submit", createStream);
  const wrap = $("frame-wrap");
  wrap.addEventListener("mousedown", onPointerDown);
  window.addEventListener("mousemove", onPointerMove);
  window.addEventListener("mouseup", onPointerUp);
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else askForToken();
  loop(refreshStreams, 2000);
  loop(refreshFrame, FRAME_POLL_MS);
  loop(refreshObjects, STATUS_POLL_MS);
});
