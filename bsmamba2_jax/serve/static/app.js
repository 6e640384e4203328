// The page of bsmamba2-serve: uploads songs to the HTTP API, follows each job, shows the stems.
// Every job is a <li class="job"> whose data-state is "uploading", "queued", "running", "done"
// or "failed". Text from the server or the user is set with textContent only (never as HTML).
"use strict";

const POLL_MS = 500;
const STORE = "bsmamba2-jobs"; // job ids of this tab, so a reload finds them again

let settings = null; // GET /api/info
const $ = (selector) => document.querySelector(selector);

function mib(bytes) {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function seconds(s) {
  const m = Math.floor(s / 60);
  return m ? `${m} min ${Math.round(s - 60 * m)} s` : `${s.toFixed(1)} s`;
}

function stored() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE) || "[]");
  } catch {
    return [];
  }
}

function remember(id, keep) {
  const ids = stored().filter((x) => x !== id);
  if (keep) ids.push(id);
  sessionStorage.setItem(STORE, JSON.stringify(ids));
}

function newCard(name) {
  const li = $("#job-template").content.firstElementChild.cloneNode(true);
  li.querySelector(".name").textContent = name;
  li.querySelector(".remove").addEventListener("click", () => removeJob(li));
  $("#jobs").append(li); // in the order sent, as the queue runs them
  return li;
}

function setState(li, state, text) {
  li.dataset.state = state;
  li.querySelector(".state").textContent = text;
}

function fail(li, text) {
  setState(li, "failed", "failed");
  li.querySelector("progress").hidden = true;
  const p = li.querySelector(".error");
  p.textContent = text;
  p.hidden = false;
}

function showProgress(li, done, total) {
  const bar = li.querySelector("progress");
  bar.hidden = false;
  bar.max = Math.max(total, 1);
  bar.value = done;
}

function render(li, job) {
  li.querySelector(".name").textContent = job.name;
  if (job.state === "queued") {
    setState(li, "queued", job.ahead ? `queued: ${job.ahead} ${job.ahead === 1 ? "job" : "jobs"} ahead` : "queued: next");
    showProgress(li, 0, job.segments_total);
  } else if (job.state === "running") {
    setState(li, "running", `separating: ${job.segments_done} / ${job.segments_total} segments`);
    showProgress(li, job.segments_done, job.segments_total);
  } else if (job.state === "failed") {
    fail(li, job.error);
  } else if (job.state === "done") {
    setState(li, "done", `done: ${seconds(job.seconds)} at ${job.sample_rate} Hz, ${job.format}`);
    li.querySelector("progress").hidden = true;
    showStems(li, job);
  }
  const warnings = li.querySelector(".warnings");
  warnings.replaceChildren(...job.warnings.map((w) => {
    const item = document.createElement("li");
    item.textContent = w;
    return item;
  }));
  warnings.hidden = job.warnings.length === 0;
}

function showStems(li, job) {
  const box = li.querySelector(".stems");
  if (box.childElementCount) return;
  for (const [stem, file] of Object.entries(job.stems)) {
    const row = $("#stem-template").content.firstElementChild.cloneNode(true);
    row.dataset.stem = stem;
    row.querySelector(".label").textContent = stem;
    row.querySelector("audio").src = file.url;
    const link = row.querySelector(".download");
    link.href = `${file.url}?download=1`;
    link.download = file.filename;
    link.textContent = "Download";
    link.title = file.filename;
    box.append(row);
  }
}

// Polls one job until it is done or failed. restored: a job of an earlier visit, whose card
// goes away quietly if the server no longer has it.
async function follow(li, restored = false) {
  const id = li.dataset.jobId;
  let response;
  try {
    response = await fetch(`/api/jobs/${encodeURIComponent(id)}`, { cache: "no-store" });
  } catch {
    setState(li, li.dataset.state, "the server does not answer; retrying…");
    setTimeout(() => follow(li, restored), 4 * POLL_MS);
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    remember(id, false);
    if (restored) li.remove();
    else fail(li, body.error || `HTTP ${response.status}`);
    return;
  }
  render(li, body);
  if (body.state === "queued" || body.state === "running") {
    setTimeout(() => follow(li, restored), POLL_MS);
  }
}

function submit(file) {
  const li = newCard(file.name);
  if (settings && file.size > settings.max_upload_bytes) {
    fail(li, `${file.name}: ${mib(file.size)} is over this server's upload limit of ` +
      `${mib(settings.max_upload_bytes)}; a larger file needs bsmamba2-serve --max-upload-mb`);
    return;
  }
  const query = new URLSearchParams({ name: file.name, format: $("#format").value });
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/api/jobs?${query}`);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  setState(li, "uploading", "uploading");
  xhr.upload.addEventListener("progress", (e) => {
    if (e.lengthComputable) {
      setState(li, "uploading", `uploading: ${Math.floor((100 * e.loaded) / e.total)}%`);
    }
  });
  xhr.addEventListener("load", () => {
    let body = {};
    try {
      body = JSON.parse(xhr.responseText);
    } catch {
      // not JSON: the status says enough
    }
    if (xhr.status !== 201) {
      fail(li, body.error || `${file.name}: the server refused it (HTTP ${xhr.status})`);
      return;
    }
    li.dataset.jobId = body.id;
    remember(body.id, true);
    render(li, body);
    follow(li);
  });
  xhr.addEventListener("error", () => fail(li, `${file.name}: the upload failed (the server closed the connection)`));
  xhr.send(file);
}

async function removeJob(li) {
  const id = li.dataset.jobId;
  if (id) {
    remember(id, false);
    await fetch(`/api/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }).catch(() => null);
  }
  li.remove();
}

function addFiles(files) {
  for (const file of files) submit(file);
}

async function start() {
  const drop = $("#drop");
  const input = $("#files");
  $("#choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  try {
    const response = await fetch("/api/info");
    settings = await response.json();
  } catch {
    const notice = $("#notice");
    notice.textContent = "The server does not answer: is bsmamba2-serve still running?";
    notice.hidden = false;
    return;
  }
  $("#model").textContent = `model: ${settings.model}`;
  $("#limits").textContent = `wav, flac, ogg and what else libsndfile reads; up to ` +
    `${mib(settings.max_upload_bytes)} a file; results are kept ` +
    `${Math.round(settings.ttl_seconds / 60)} minutes`;
  const select = $("#format");
  for (const f of settings.formats) {
    const option = new Option(f.label, f.name, false, f.name === settings.default_format);
    select.append(option);
  }
  for (const id of stored()) {
    const li = newCard("…");
    li.dataset.jobId = id;
    follow(li, true);
  }
  document.body.dataset.ready = "true";
}

start();
