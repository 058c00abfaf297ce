// The search page: plain JS against the JSON API of yolo_vq/serve/app.py (no build step, no CDN).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { file: null, box: null, viewer: null, busy: 0 };

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

// fetch + JSON with a loading indicator; every error the API returns becomes one readable message
async function api(path, options = {}, what = "loading") {
  state.busy += 1;
  $("#status").className = "busy";
  $("#status").textContent = what + "…";
  showError("");
  try {
    let response;
    try {
      response = await fetch(path, options);
    } catch (e) {
      throw new Error(`the server did not answer (${e.message}): is yolo-vq serve still running?`);
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : response.statusText;
      throw new Error(`${what} failed (${response.status}): ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    return body;
  } finally {
    state.busy -= 1;
    if (!state.busy) { $("#status").className = ""; $("#status").textContent = ""; }
  }
}

async function loadInfo() {
  const [info, sources] = await Promise.all([api("/info"), api("/sources")]);
  $("#info").textContent = `${info.index}: ${info.detections.toLocaleString()} detections in ${info.sources} ` +
    `source(s), ${info.code_bytes} B each, ${info.mode} search`;
  for (const c of info.classes) $("#classes").append(el("option", { value: c }, c));
  for (const s of sources) $("#source").append(el("option", { value: s.id }, `${s.id}: ${s.name}`));
  state.maxUpload = info.max_upload_bytes;
  state.sources = Object.fromEntries(sources.map((s) => [s.id, s]));
}

// -- the query image: upload, drop or paste; detections to click; a box to drag ------------------------------------
async function setImage(file) {
  if (!file) return;
  if (state.maxUpload && file.size > state.maxUpload) {
    showError(`${file.name || "the image"} is ${(file.size / 1048576).toFixed(1)} MB: the limit is ` +
              `${Math.floor(state.maxUpload / 1048576)} MB`);
    return;
  }
  state.file = file;
  state.box = null;
  const img = $("#qimg");
  img.src = URL.createObjectURL(file);
  $("#stage").hidden = false;
  $("#stage-hint").hidden = false;
  $("#boxes").replaceChildren();
  const form = new FormData();
  form.append("image", file);
  let found;
  try {
    found = await api("/detect", { method: "POST", body: form }, "detecting");
  } catch (e) {
    showError(e.message);
    return;
  }
  state.size = [found.width, found.height];
  for (const d of found.detections) {
    const [x1, y1, x2, y2] = d.box;
    const box = el("div", {
      class: "det", title: `${d.class} ${d.confidence}`, dataset: { box: d.box.join(",") },
      style: `left:${100 * x1 / found.width}%;top:${100 * y1 / found.height}%;` +
             `width:${100 * (x2 - x1) / found.width}%;height:${100 * (y2 - y1) / found.height}%`,
    }, el("span", {}, `${d.class} ${d.confidence.toFixed(2)}`));
    box.addEventListener("mousedown", (ev) => ev.stopPropagation());
    box.addEventListener("click", () => {
      document.querySelectorAll(".det.chosen").forEach((b) => b.classList.remove("chosen"));
      box.classList.add("chosen");
      searchImage(d.box);
    });
    $("#boxes").append(box);
  }
  if (!found.detections.length) $("#stage-hint").textContent = "No detections found: drag a box to search for a region.";
}

function stagePoint(ev) {  // mouse position in the image's pixels
  const r = $("#qimg").getBoundingClientRect();
  const [w, h] = state.size || [$("#qimg").naturalWidth, $("#qimg").naturalHeight];
  return [Math.min(Math.max(0, (ev.clientX - r.left) / r.width), 1) * w,
          Math.min(Math.max(0, (ev.clientY - r.top) / r.height), 1) * h, r];
}

function dragBox() {
  const stage = $("#stage"), drawing = $("#drawing");
  let start = null;
  stage.addEventListener("mousedown", (ev) => { start = stagePoint(ev); ev.preventDefault(); });
  window.addEventListener("mousemove", (ev) => {
    if (!start) return;
    const [x, y, r] = stagePoint(ev);
    const sx = r.width / (state.size ? state.size[0] : 1), sy = r.height / (state.size ? state.size[1] : 1);
    Object.assign(drawing.style, { left: `${Math.min(x, start[0]) * sx}px`, top: `${Math.min(y, start[1]) * sy}px`,
      width: `${Math.abs(x - start[0]) * sx}px`, height: `${Math.abs(y - start[1]) * sy}px` });
    drawing.hidden = false;
  });
  window.addEventListener("mouseup", (ev) => {
    if (!start) return;
    const [x, y] = stagePoint(ev);
    const box = [Math.min(x, start[0]), Math.min(y, start[1]), Math.max(x, start[0]), Math.max(y, start[1])]
      .map((v) => Math.round(v * 10) / 10);
    start = null;
    drawing.hidden = true;
    if (box[2] - box[0] >= 4 && box[3] - box[1] >= 4) searchImage(box);
  });
}

// -- searching -----------------------------------------------------------------------------------------------------
function filters(form) {
  const classes = [...$("#classes").selectedOptions].map((o) => o.value);
  if (classes.length) form.append("classes", classes.join(","));
  for (const id of ["source", "time_from", "time_to", "min_conf", "k", "rerank", "per_track"]) {
    const v = $("#" + id).value.trim();
    if (v !== "") form.append(id, v);
  }
  return form;
}

function searchImage(box) {
  state.box = box;
  const form = new FormData();
  form.append("image", state.file);
  form.append("box", box.join(","));
  return search(form, () => cropOfQuery(box));
}

function searchDetection(id) {
  const form = new FormData();
  form.append("detection", id);
  return search(form, () => el("img", { src: `/detections/${id}/crop.jpg`, alt: `detection ${id}` }));
}

function searchTrack(track) {
  const form = new FormData();
  form.append("track", track);
  return search(form, () => el("span", {}, `track ${track}`));
}

function cropOfQuery(box) {  // the query region, cut from the uploaded image on a canvas
  const img = $("#qimg"), [x1, y1, x2, y2] = box;
  const scale = img.naturalWidth / (state.size ? state.size[0] : img.naturalWidth);
  const canvas = el("canvas", { width: Math.max(1, Math.round((x2 - x1) * scale)),
                                height: Math.max(1, Math.round((y2 - y1) * scale)) });
  canvas.getContext("2d").drawImage(img, x1 * scale, y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale,
                                    0, 0, canvas.width, canvas.height);
  canvas.style.height = "96px";
  return canvas;
}

async function search(form, picture) {
  let answer;
  try {
    answer = await api("/search", { method: "POST", body: filters(form) }, "searching");
  } catch (e) {
    showError(e.message);
    return;
  }
  const q = answer.query;
  const shown = $("#query-shown");
  const what = q.kind === "image" ? `region ${q.box ? q.box.join(", ") : "(first detection)"} of the image`
    : q.kind === "detection" ? `stored detection ${q.detection}` : `track ${q.track}`;
  shown.replaceChildren(picture(), el("div", {}, el("b", {}, "Query: "), what,
    el("br"), `${answer.results.length} results of ${answer.searched.toLocaleString()} detections`));
  shown.dataset.kind = q.kind;
  shown.dataset.box = q.box ? q.box.join(",") : "";
  shown.hidden = false;
  const grid = $("#results");
  grid.replaceChildren();
  if (!answer.results.length) grid.append(el("p", {}, `No results: ${answer.empty}`));
  answer.results.forEach((r, rank) => grid.append(tile(r, rank + 1)));
}

function tile(r, rank) {
  const name = r.source.split(/[\\/]/).pop();
  return el("div", { class: "tile", dataset: { id: r.id }, title: `detection ${r.id} — click for its frame`,
                     onclick: () => openViewer(r) },
    el("img", { src: `/detections/${r.id}/crop.jpg`, alt: `detection ${r.id}`, loading: "lazy" }),
    el("div", {}, el("span", { class: "score" }, `#${rank}  ${r.score.toFixed(3)}`), `  ${r.class}`),
    el("div", {}, `${r.time.toFixed(2)} s · frame ${r.frame}`),
    el("div", {}, `${name} · track ${r.track >= 0 ? r.track : "–"}`),
    ...(r.track_start !== undefined && r.track >= 0
      ? [el("div", {}, `seen ${r.track_start.toFixed(1)}–${r.track_end.toFixed(1)} s`)] : []));
}

// -- the frame viewer: the detection's frame, neighbouring frames, search again from it ----------------------------
async function openViewer(r) {
  const row = await api(`/detections/${r.id}`).catch((e) => { showError(e.message); return null; });
  if (!row) return;
  state.viewer = { row, frame: row.frame };
  $("#viewer-img").src = `/detections/${row.id}/frame.jpg`;
  $("#viewer-caption").textContent = `detection ${row.id}: ${row.class}, ${row.time.toFixed(2)} s, frame ` +
    `${row.frame}, track ${row.track}, ${row.source.split(/[\\/]/).pop()}`;
  $("#search-track").disabled = row.track < 0;
  $("#viewer").hidden = false;
}

async function stepFrame(delta) {
  const v = state.viewer;
  if (!v) return;
  const frame = v.frame + delta;
  try {
    const rows = await api(`/sources/${v.row.source_id}/frames/${frame}`, {}, "loading the frame");
    const probe = await fetch(`/sources/${v.row.source_id}/frames/${frame}.jpg`, { method: "GET" });
    if (!probe.ok) throw new Error(`frame ${frame}: ${(await probe.json()).detail}`);
    v.frame = frame;
    $("#viewer-img").src = URL.createObjectURL(await probe.blob());
    $("#viewer-caption").textContent = `frame ${frame} of ${v.row.source.split(/[\\/]/).pop()}: ` +
      `${rows.detections.length} stored detection(s)`;
  } catch (e) {
    showError(e.message);
  }
}

function wire() {
  $("#file").addEventListener("change", (ev) => setImage(ev.target.files[0]));
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); setImage(ev.dataTransfer.files[0]); });
  document.addEventListener("paste", (ev) => {
    const item = [...ev.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) setImage(item.getAsFile());
  });
  dragBox();
  $("#by-id").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("#detection").value.trim(), track = $("#track").value.trim();
    if (id) searchDetection(id);
    else if (track) searchTrack(track);
    else showError("type a detection id or a track (source:track) to search from");
  });
  $("#filters").addEventListener("change", () => {  // search again with the new filters
    if (state.box && state.file) searchImage(state.box);
  });
  $("#close-viewer").addEventListener("click", () => { $("#viewer").hidden = true; });
  $("#prev-frame").addEventListener("click", () => stepFrame(-1));
  $("#next-frame").addEventListener("click", () => stepFrame(1));
  $("#search-detection").addEventListener("click", () => { $("#viewer").hidden = true; searchDetection(state.viewer.row.id); });
  $("#search-track").addEventListener("click", () => {
    $("#viewer").hidden = true;
    searchTrack(`${state.viewer.row.source_id}:${state.viewer.row.track}`);
  });
  document.addEventListener("keydown", (ev) => {
    if ($("#viewer").hidden) return;
    if (ev.key === "Escape") $("#viewer").hidden = true;
    if (ev.key === "ArrowLeft") stepFrame(-1);
    if (ev.key === "ArrowRight") stepFrame(1);
  });
  loadInfo().catch((e) => showError(e.message));
}

wire();
