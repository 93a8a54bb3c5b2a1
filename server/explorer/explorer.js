// The explorer page: builds requests of the v2 REST protocol this server serves, from what
// the server says of itself (the repository index, each model's metadata and the kinds in
// its OpenAPI document), and draws the answers. Every path is relative to the page, so the
// page works wherever the server is mounted (a path prefix, TLS).
"use strict";

const $ = (id) => document.getElementById(id);
const CURVE_POINTS = 101;
const FD_STEP = 1e-3; // relative step of the finite-difference check
const state = { kinds: [], versions: {}, meta: null, mode: null, copy: "curl", request: null };

function url(path) {
  return new URL(path, document.baseURI).href;
}

async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url(path), init);
  const text = await response.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const message = data && data.error ? data.error : text || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return data;
}

function findKey(node, key) {
  if (node === null || typeof node !== "object") return undefined;
  if (key in node) return node[key];
  for (const value of Object.values(node)) {
    const found = findKey(value, key);
    if (found !== undefined) return found;
  }
  return undefined;
}

function showError(error) {
  const box = $("error");
  box.textContent = String(error.message || error);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function product(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

function kind() {
  return state.kinds.find((k) => k.name === $("derivative").value);
}

function modelPath() {
  const version = $("version").value;
  const name = encodeURIComponent($("model").value);
  return version ? `v2/models/${name}/versions/${version}` : `v2/models/${name}`;
}

function rowShape() {
  return state.meta.inputs[0].shape.slice(1);
}

function outputWidth() {
  const y = state.meta.outputs.find((o) => o.name === "y") || state.meta.outputs[0];
  return product(y.shape.slice(1));
}

// ---- start ------------------------------------------------------------------------------

async function start() {
  const params = new URLSearchParams(location.search);
  try {
    const document_ = await call("GET", "v2/openapi.json");
    state.kinds = findKey(document_, "x-gradserve-kinds") || [];
    for (const k of state.kinds) $("derivative").add(new Option(k.name, k.name));
    const index = await call("POST", "v2/repository/index", { ready: true });
    for (const entry of index) {
      (state.versions[entry.name] = state.versions[entry.name] || []).push(entry.version);
    }
    for (const name of Object.keys(state.versions).sort()) $("model").add(new Option(name, name));
    if (params.get("derivative")) $("derivative").value = params.get("derivative");
    if (params.get("model")) {
      if (!(params.get("model") in state.versions)) {
        throw new Error(`the server serves no model named "${params.get("model")}"; it serves: ` +
          Object.keys(state.versions).join(", "));
      }
      $("model").value = params.get("model");
    }
    fillVersions(params.get("version"));
    await loadModel(params);
    kindChanged(params);
    if (params.get("model")) await compute();
  } catch (error) {
    showError(error);
  }
}

function fillVersions(chosen) {
  const select = $("version");
  select.replaceChildren(new Option("latest", ""));
  for (const version of state.versions[$("model").value] || []) {
    select.add(new Option(version, version));
  }
  if (chosen) select.value = chosen;
}

async function loadModel(params) {
  state.meta = await call("GET", modelPath());
  const shape = rowShape();
  const size = product(shape);
  state.mode = size === 1 ? "scalar" : shape.length === 3 && shape[0] >= 8 && shape[1] >= 8
    ? "image" : size <= 32 ? "table" : "json";
  for (const id of ["scalar-input", "table-input", "image-input", "json-input"]) {
    $(id).hidden = !id.startsWith(state.mode);
  }
  if (state.mode === "scalar") {
    $("x").value = params.get("x") || "0.5";
    $("lo").value = params.get("lo") || "0";
    $("hi").value = params.get("hi") || "1";
    syncSlider();
  } else if (state.mode === "table") {
    const given = (params.get("x") || "").split(",").filter((s) => s !== "");
    const table = $("table-input");
    table.replaceChildren();
    for (let i = 0; i < size; i += 1) {
      const input = document.createElement("input");
      input.type = "number";
      input.step = "any";
      input.value = given[i] !== undefined ? given[i] : "0.5";
      input.setAttribute("aria-label", `x[${i}]`);
      input.className = "feature";
      table.append(input);
    }
  } else if (state.mode === "image") {
    clearPad();
  } else {
    $("json").value = params.get("x") || JSON.stringify([new Array(size).fill(0)]);
  }
}

function kindChanged(params) {
  const k = kind();
  if (!k) return;
  $("target-field").hidden = !k.target;
  if (params && params.get("target")) $("target").value = params.get("target");
  $("vector-field").hidden = !k.vector;
  if (params && params.get("v")) $("vector").value = params.get("v");
  const options = $("options");
  options.replaceChildren();
  for (const option of k.options) {
    const label = document.createElement("label");
    label.textContent = `${option.name} `;
    const input = document.createElement("input");
    input.id = `option-${option.name}`;
    if (option.type === "boolean") {
      input.type = "checkbox";
      input.checked = params && params.get(option.name) ? params.get(option.name) === "true"
        : Boolean(option.default);
    } else {
      input.type = "number";
      input.step = option.type === "integer" ? "1" : "any";
      input.value = (params && params.get(option.name)) || String(option.default);
    }
    label.append(input);
    options.append(label);
  }
}

// ---- inputs -----------------------------------------------------------------------------

function syncSlider() {
  const slider = $("x-slider");
  slider.min = $("lo").value;
  slider.max = $("hi").value;
  slider.step = String((Number($("hi").value) - Number($("lo").value)) / 1000 || 0.001);
  slider.value = $("x").value;
}

function clearPad() {
  const pad = $("pad").getContext("2d");
  pad.fillStyle = "black";
  pad.fillRect(0, 0, 256, 256);
}

function padRows() {
  const [h, w, c] = rowShape();
  const scratch = document.createElement("canvas");
  scratch.width = w;
  scratch.height = h;
  const context = scratch.getContext("2d");
  context.drawImage($("pad"), 0, 0, w, h);
  const pixels = context.getImageData(0, 0, w, h).data;
  const row = [];
  for (let i = 0; i < h * w; i += 1) {
    const grey = (pixels[4 * i] + pixels[4 * i + 1] + pixels[4 * i + 2]) / (3 * 255);
    for (let j = 0; j < c; j += 1) row.push(c === 3 ? pixels[4 * i + j] / 255 : grey);
  }
  return [row];
}

function rows() {
  if (state.mode === "scalar") return [[Number($("x").value)]];
  if (state.mode === "table") {
    return [Array.from(document.querySelectorAll(".feature"), (input) => Number(input.value))];
  }
  if (state.mode === "image") return padRows();
  const parsed = JSON.parse($("json").value);
  return Array.isArray(parsed[0]) ? parsed.map((r) => r.flat(Infinity)) : [parsed.flat(Infinity)];
}

function parameters() {
  const k = kind();
  const result = { derivative: k.name };
  if (k.target && $("target").value !== "") result.target = Number($("target").value);
  for (const option of k.options) {
    const input = $(`option-${option.name}`);
    result[option.name] = option.type === "boolean" ? input.checked : Number(input.value);
  }
  return result;
}

function body(xs, params, vector) {
  const shape = rowShape();
  const datatype = state.meta.inputs[0].datatype;
  const inputs = [{ name: "x", shape: [xs.length, ...shape], datatype, data: xs.flat() }];
  if (vector) {
    const vs = vector.map((r) => r.flat(Infinity));
    const width = vs[0].length;
    inputs.push({ name: "v", shape: [vs.length, width], datatype, data: vs.flat() });
  }
  return { inputs, parameters: params };
}

function vectorRows(n) {
  if (!kind().vector) return null;
  const text = $("vector").value.trim();
  if (!text) {
    const width = kind().name === "vjp" ? outputWidth() : product(rowShape());
    return Array.from({ length: n }, () => new Array(width).fill(1));
  }
  const parsed = JSON.parse(text);
  return Array.isArray(parsed[0]) ? parsed : [parsed];
}

async function infer(xs, params, vector) {
  const request = body(xs, params, vector);
  const answer = await call("POST", `${modelPath()}/infer`, request);
  const outputs = {};
  for (const output of answer.outputs) outputs[output.name] = output;
  return { answer, outputs, request };
}

// ---- compute ----------------------------------------------------------------------------

async function compute() {
  clearError();
  try {
    const xs = rows();
    const params = parameters();
    const vector = vectorRows(xs.length);
    const point = await infer(xs, params, vector);
    state.request = point.request;
    saveUrl();
    show(point, xs);
    if (state.mode === "scalar" && !kind().vector) await drawCurve(params);
    await finiteDifference(point, xs);
    renderCopy();
  } catch (error) {
    showError(error);
  }
}

function derivativeOf(outputs) {
  return outputs.dy_dx || outputs.attributions;
}

function show(point, xs) {
  const { answer, outputs } = point;
  $("result").hidden = false;
  $("copy").hidden = false;
  const d = derivativeOf(outputs);
  const y = outputs.y.data;
  const name = kind().name;
  let summary = `y = ${fmt(y.slice(0, 8))}`;
  if (d) summary += `; ${name === "gradient" ? "dy/dx" : name} = ${fmt(d.data.slice(0, 8))}`;
  if (outputs.delta) summary += `; completeness gap (delta) = ${fmt(outputs.delta.data)}`;
  $("summary").textContent = summary;
  $("raw").textContent = JSON.stringify(answer, null, 1);
  $("bars-figure").hidden = !(d && state.mode === "table" && d.data.length === xs[0].length);
  if (!$("bars-figure").hidden) drawBars(d.data);
  $("heat-figure").hidden = !(d && state.mode === "image" && d.data.length === xs[0].length);
  if (!$("heat-figure").hidden) drawHeat(xs[0], d.data);
  drawMatrix(name === "jacobian" || name === "hessian" ? d : null, xs[0].length);
  drawHops(answer.parameters || {});
  $("curve-figure").hidden = state.mode !== "scalar" || kind().vector;
}

function fmt(values) {
  const list = Array.from(values, (v) => Number(v).toFixed(4).replace(/\.?0+$/, (m) =>
    m.startsWith(".") ? "" : m));
  return list.length === 1 ? list[0] : `[${list.join(", ")}]`;
}

async function drawCurve(params) {
  const lo = Number($("lo").value);
  const hi = Number($("hi").value);
  const xs = Array.from({ length: CURVE_POINTS }, (_, i) => [lo + ((hi - lo) * i) / (CURVE_POINTS - 1)]);
  const { outputs } = await infer(xs, { ...params });
  const ys = outputs.y.data;
  const ds = derivativeOf(outputs) ? derivativeOf(outputs).data : null;
  const svg = $("curve");
  const width = 640;
  const height = 320;
  const pad = 40;
  const all = ds ? ys.concat(ds) : ys;
  const top = Math.max(...all);
  const bottom = Math.min(...all);
  const sx = (x) => pad + ((x - lo) / (hi - lo || 1)) * (width - 2 * pad);
  const sy = (v) => height - pad - ((v - bottom) / (top - bottom || 1)) * (height - 2 * pad);
  const path = (values) => values.map((v, i) => `${i ? "L" : "M"}${sx(xs[i][0]).toFixed(1)},${sy(v).toFixed(1)}`).join("");
  const x = Number($("x").value);
  const at = Math.round(((x - lo) / (hi - lo || 1)) * (CURVE_POINTS - 1));
  const parts = [
    `<line x1="${pad}" y1="${sy(0)}" x2="${width - pad}" y2="${sy(0)}" class="axis"/>`,
    `<text x="${pad}" y="${pad - 10}">${fmt([top])}</text>`,
    `<text x="${pad}" y="${height - 10}">${fmt([bottom])}</text>`,
    `<text x="${width / 2}" y="${height - 10}" text-anchor="middle">x from ${fmt([lo])} to ${fmt([hi])}</text>`,
    `<path d="${path(ys)}" class="y"/>`,
  ];
  if (ds) parts.push(`<path d="${path(ds)}" class="d"/>`);
  if (at >= 0 && at < CURVE_POINTS) {
    parts.push(`<circle cx="${sx(x)}" cy="${sy(ys[at])}" r="4" class="y"/>`);
  }
  svg.innerHTML = parts.join("");
}

function drawBars(values) {
  const svg = $("bars");
  const width = 640;
  const height = 240;
  const top = Math.max(...values.map(Math.abs)) || 1;
  const step = (width - 40) / values.length;
  const mid = height / 2;
  const parts = [`<line x1="20" y1="${mid}" x2="${width - 20}" y2="${mid}" class="axis"/>`];
  values.forEach((v, i) => {
    const h = (Math.abs(v) / top) * (mid - 20);
    const y = v >= 0 ? mid - h : mid;
    parts.push(`<rect x="${20 + i * step + 2}" y="${y}" width="${step - 4}" height="${h}" class="${v >= 0 ? "pos" : "neg"}"><title>x[${i}]: ${v}</title></rect>`);
  });
  svg.innerHTML = parts.join("");
}

function drawHeat(input, values) {
  const [h, w, c] = rowShape();
  const top = Math.max(...values.map(Math.abs)) || 1;
  const paint = (canvasId, colour) => {
    const canvas = $(canvasId);
    const context = canvas.getContext("2d");
    const cell = canvas.width / w;
    for (let i = 0; i < h; i += 1) {
      for (let j = 0; j < w; j += 1) {
        context.fillStyle = colour(i * w + j);
        context.fillRect(j * cell, i * cell, cell, cell);
      }
    }
  };
  const pixel = (k) => {
    let s = 0;
    for (let j = 0; j < c; j += 1) s += input[k * c + j];
    return s / c;
  };
  const attribution = (k) => {
    let s = 0;
    for (let j = 0; j < c; j += 1) s += values[k * c + j];
    return s / top;
  };
  const grey = (k) => `rgb(${Array(3).fill(Math.round(255 * Math.min(1, Math.max(0, pixel(k))))).join(",")})`;
  const heat = (k, alpha) => {
    const a = attribution(k);
    return a >= 0 ? `rgba(220,40,40,${Math.min(1, a) * alpha})` : `rgba(40,80,220,${Math.min(1, -a) * alpha})`;
  };
  paint("input-view", grey);
  paint("heat", (k) => heat(k, 1));
  paint("overlay", grey);
  paint("overlay", (k) => heat(k, 0.7));
}

function drawMatrix(d, inputs) {
  const box = $("matrix");
  box.replaceChildren();
  if (!d || d.data.length > 64 * 64) return;
  const columns = inputs;
  const top = Math.max(...d.data.map(Math.abs)) || 1;
  const table = document.createElement("table");
  table.className = "matrix";
  table.setAttribute("aria-label", `${kind().name} (rows: outputs, columns: inputs)`);
  for (let r = 0; r * columns < d.data.length; r += 1) {
    const tr = table.insertRow();
    for (let col = 0; col < columns; col += 1) {
      const v = d.data[r * columns + col];
      const td = tr.insertCell();
      td.textContent = Number(v).toPrecision(3);
      td.style.background = v >= 0 ? `rgba(220,40,40,${Math.abs(v) / top * 0.6})` : `rgba(40,80,220,${Math.abs(v) / top * 0.6})`;
    }
  }
  box.append(table);
}

function drawHops(parameters) {
  const table = $("hops");
  table.replaceChildren();
  const caption = table.createCaption();
  caption.textContent = "Where the time went in the server (microseconds)";
  for (const [name, value] of Object.entries(parameters)) {
    if (!name.endsWith("_us") && name !== "batch_rows") continue;
    const row = table.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = String(value);
  }
}

async function finiteDifference(point, xs) {
  const check = $("check");
  check.textContent = "";
  const name = kind().name;
  if (name !== "gradient" || xs.length !== 1 || xs[0].length > 32) return;
  const served = point.outputs.dy_dx.data;
  const target = parameters().target;
  const shifted = [];
  for (let i = 0; i < xs[0].length; i += 1) {
    const h = FD_STEP * Math.max(1, Math.abs(xs[0][i]));
    const up = xs[0].slice();
    const down = xs[0].slice();
    up[i] += h;
    down[i] -= h;
    shifted.push(up, down);
  }
  const { outputs } = await infer(shifted, { derivative: "none" });
  const width = outputWidth();
  const ys = outputs.y.data;
  const scalar = (r) => {
    let s = 0;
    for (let j = 0; j < width; j += 1) if (target === undefined || target === j) s += ys[r * width + j];
    return s;
  };
  const estimate = xs[0].map((x, i) => (scalar(2 * i) - scalar(2 * i + 1)) / (2 * FD_STEP * Math.max(1, Math.abs(x))));
  const scale = Math.max(...served.map(Math.abs), 1e-12);
  const gap = Math.max(...estimate.map((e, i) => Math.abs(e - served[i]))) / scale;
  check.textContent = `Finite-difference check from the server's own outputs: ${fmt(estimate)} ` +
    `against ${fmt(served)} (relative gap ${gap.toExponential(1)}; a ReLU kink near x makes it large).`;
}

// ---- state in the URL, and copy as -------------------------------------------------------

function saveUrl() {
  const params = new URLSearchParams();
  params.set("model", $("model").value);
  if ($("version").value) params.set("version", $("version").value);
  params.set("derivative", $("derivative").value);
  if (state.mode === "scalar") {
    params.set("x", $("x").value);
    params.set("lo", $("lo").value);
    params.set("hi", $("hi").value);
  } else if (state.mode === "table") {
    params.set("x", rows()[0].join(","));
  } else if (state.mode === "json") {
    params.set("x", $("json").value);
  }
  const k = kind();
  if (k.target && $("target").value !== "") params.set("target", $("target").value);
  for (const option of k.options) {
    const input = $(`option-${option.name}`);
    params.set(option.name, option.type === "boolean" ? String(input.checked) : input.value);
  }
  if (k.vector && $("vector").value.trim()) params.set("v", $("vector").value.trim());
  history.replaceState(null, "", `?${params}`);
}

function renderCopy() {
  const request = state.request;
  if (!request) return;
  const endpoint = url(`${modelPath()}/infer`);
  const name = $("model").value;
  const x = request.inputs[0];
  const params = request.parameters;
  const array = JSON.stringify(x.data);
  const shape = `(${x.shape.join(", ")})`;
  const grpcTarget = `${location.hostname}:50051`;
  const snippets = {
    curl: `curl -s -X POST ${endpoint} \\\n  -H 'content-type: application/json' \\\n  -d '${JSON.stringify(request)}'`,
    python: [
      "import numpy as np",
      "from gradserve.client import GradientClient",
      "",
      `x = np.array(${array}, np.float32).reshape${shape}`,
      `with GradientClient("${grpcTarget}") as client:  # the server's gRPC port`,
      `    answer = client.evaluate(x, "${params.derivative}", model="${name}"${sdkOptions(params)})`,
      "print(answer.y, answer.dy_dx)",
    ].join("\n"),
    triton: [
      "import numpy as np",
      "import tritonclient.http as triton",
      "",
      `x = np.array(${array}, np.float32).reshape${shape}`,
      `tensor = triton.InferInput("x", list(x.shape), "${x.datatype}")`,
      "tensor.set_data_from_numpy(x)",
      `client = triton.InferenceServerClient("${location.host}")`,
      `answer = client.infer("${name}", [tensor], parameters=${JSON.stringify(params)})`,
      'print(answer.as_numpy("y"), answer.as_numpy("dy_dx"))',
    ].join("\n"),
  };
  $("snippet").textContent = snippets[state.copy];
}

function sdkOptions(params) {
  return Object.entries(params)
    .filter(([key]) => key !== "derivative")
    .map(([key, value]) => `, ${key}=${typeof value === "boolean" ? (value ? "True" : "False") : value}`)
    .join("");
}

// ---- wiring -----------------------------------------------------------------------------

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  compute();
});
$("model").addEventListener("change", async () => {
  clearError();
  try {
    fillVersions(null);
    await loadModel(new URLSearchParams());
  } catch (error) {
    showError(error);
  }
});
$("version").addEventListener("change", () => loadModel(new URLSearchParams()).catch(showError));
$("derivative").addEventListener("change", () => kindChanged(null));
$("x-slider").addEventListener("input", () => {
  $("x").value = $("x-slider").value;
});
$("x-slider").addEventListener("change", () => compute());
for (const id of ["lo", "hi", "x"]) $(id).addEventListener("change", syncSlider);
$("clear").addEventListener("click", clearPad);
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (!file) return;
  const image = new Image();
  image.onload = () => $("pad").getContext("2d").drawImage(image, 0, 0, 256, 256);
  image.src = URL.createObjectURL(file);
});
for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", () => {
    state.copy = button.dataset.copy;
    renderCopy();
    if (navigator.clipboard) navigator.clipboard.writeText($("snippet").textContent).catch(() => {});
  });
}
(() => {
  const pad = $("pad");
  let drawing = false;
  const at = (event) => {
    const box = pad.getBoundingClientRect();
    return [((event.clientX - box.left) / box.width) * 256, ((event.clientY - box.top) / box.height) * 256];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    const context = pad.getContext("2d");
    context.beginPath();
    context.moveTo(...at(event));
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const context = pad.getContext("2d");
    context.strokeStyle = "white";
    context.lineWidth = 24;
    context.lineCap = "round";
    context.lineTo(...at(event));
    context.stroke();
  });
  for (const end of ["pointerup", "pointerleave"]) pad.addEventListener(end, () => { drawing = false; });
})();

start();
