// The dconnx explanation page: one image, the model's top classes, and every map of the model
// drawn over the image with the colormaps of `dconnx explain` (sent by /page/config).
// What the page last received is kept in window.dconnxLast (raw map values as Float32Array).
// A dense (segmentation) model also gets a region box, dragged on the image or typed, sent as
// `region` with every request; its classes are ranked by their sum over the region.
"use strict";
(function () {
  const DEBOUNCE_MS = 150;      // one request per settled slider change
  const $ = (id) => document.getElementById(id);
  const state = {
    config: null, model: null, H: 0, W: 0,
    file: null, fileName: "", picture: null,      // picture: Float32Array [H*W*3] in [0, 1]
    target: null, alpha: null, strength: 0.65,
    dense: false, region: null, drag: null,       // region: [x0, y0, x1, y1] model-input pixels or null
    seq: 0, timer: null, controller: null, last: null,
  };
  window.dconnxRequests = 0;     // /explain requests sent
  window.dconnxUpdates = 0;      // responses drawn
  window.dconnxErrors = [];      // every error shown
  window.dconnxLast = null;
  window.dconnxReady = false;

  // -- errors: always shown in the role=alert element -------------------------
  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = false;
    window.dconnxErrors.push(message);
  }
  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }
  window.addEventListener("error", (e) => showError("page error: " + e.message));
  window.addEventListener("unhandledrejection", (e) =>
    showError("page error: " + ((e.reason && e.reason.message) || e.reason)));

  function serverMessage(response, body) {
    const kind = body && body.type ? ` (${body.type})` : "";
    const text = body && body.error ? body.error : response.statusText || "no details";
    return `server error ${response.status}${kind}: ${text}`;
  }
  async function getJSON(url) {
    const r = await fetch(url);
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(serverMessage(r, body));
    return body;
  }
  function setStatus(text) { $("status").textContent = text; }

  // -- numbers as `dconnx explain` prints them ----------------------------------
  function fmt3g(v) {                      // Python's f"{v:.3g}"
    if (v === 0) return "0";
    if (!isFinite(v)) return String(v);
    const e = Math.floor(Math.log10(Math.abs(Number(v.toPrecision(3)))));
    if (e < -4 || e >= 3) {
      let [m, x] = v.toExponential(2).split("e");
      if (m.includes(".")) m = m.replace(/0+$/, "").replace(/\.$/, "");
      const n = parseInt(x, 10);
      return `${m}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
    }
    let s = v.toPrecision(3);
    if (s.includes(".")) s = s.replace(/0+$/, "").replace(/\.$/, "");
    return s;
  }
  const tickLabel = (v) => (v === 0 ? "0" : fmt3g(v));

  // -- arrays sent by the server: {"dtype", "shape", "b64"} little-endian --------
  function half(bits) {
    const s = bits & 0x8000 ? -1 : 1, e = (bits >> 10) & 0x1f, f = bits & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }
  function decodeArray(enc) {
    const bin = atob(enc.b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const view = new DataView(bytes.buffer);
    const size = { float32: 4, float64: 8, float16: 2 }[enc.dtype];
    if (!size) throw new Error(`the server sent an array of dtype ${enc.dtype}`);
    const n = bytes.length / size, out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      out[i] = size === 4 ? view.getFloat32(4 * i, true)
        : size === 8 ? view.getFloat64(8 * i, true) : half(view.getUint16(2 * i, true));
    }
    return out;
  }

  // -- map styles and overlays: dconnx.viz.MapStyle and dconnx.viz.overlay -------
  function styleOf(method, data) {
    const given = state.config.styles[method] || { signed: true, cmap: "bwr" };
    let lo = Infinity, hi = -Infinity;
    for (const v of data) { if (v < lo) lo = v; if (v > hi) hi = v; }
    if (given.signed) {
      const m = Math.max(Math.abs(lo), Math.abs(hi));
      return { signed: true, cmap: given.cmap, vmin: -m, vmax: m };
    }
    const vmin = Math.min(lo, 0);
    return { signed: false, cmap: given.cmap, vmin, vmax: Math.max(hi, vmin) };
  }
  function position(st, v) {
    const span = st.vmax - st.vmin;
    if (span === 0) return st.signed ? 0.5 : 0;
    return Math.min(1, Math.max(0, (v - st.vmin) / span));
  }
  function colorAt(stops, t) {            // piecewise-linear, as Colormap.__call__ (np.interp)
    const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    return [0, 1, 2].map((c) => stops[i][c] * (1 - f) + stops[i + 1][c] * f);
  }
  function ticks(st) {
    if (st.vmin === st.vmax) return [st.vmax];
    return [st.vmax, st.signed ? 0 : (st.vmin + st.vmax) / 2, st.vmin];
  }
  function resize(data, h, w, H, W) {     // bilinear, pixel centres aligned (maps kept at a layer's size)
    if (h === H && w === W) return data;
    const out = new Float32Array(H * W);
    for (let y = 0; y < H; y++) {
      const sy = Math.min(h - 1, Math.max(0, (y + 0.5) * h / H - 0.5));
      const y0 = Math.floor(sy), y1 = Math.min(h - 1, y0 + 1), fy = sy - y0;
      for (let x = 0; x < W; x++) {
        const sx = Math.min(w - 1, Math.max(0, (x + 0.5) * w / W - 0.5));
        const x0 = Math.floor(sx), x1 = Math.min(w - 1, x0 + 1), fx = sx - x0;
        out[y * W + x] = (data[y0 * w + x0] * (1 - fx) + data[y0 * w + x1] * fx) * (1 - fy)
          + (data[y1 * w + x0] * (1 - fx) + data[y1 * w + x1] * fx) * fy;
      }
    }
    return out;
  }
  function drawOverlay(canvas, heat, st, strength) {
    const { H, W } = state, stops = state.config.colormaps[st.cmap];
    const img = canvas.getContext("2d").createImageData(W, H);
    for (let p = 0; p < H * W; p++) {
      const t = position(st, heat[p]);
      const w = strength * Math.sqrt(st.signed ? Math.abs(2 * t - 1) : t);
      const col = colorAt(stops, t);
      const rgb = state.picture ? [0, 1, 2].map((c) => state.picture[3 * p + c]) : [0.5, 0.5, 0.5];
      const gray = (rgb[0] + rgb[1] + rgb[2]) / 3;
      for (let c = 0; c < 3; c++) {
        const v = (1 - w) * (0.35 * rgb[c] + 0.65 * gray) + w * col[c];
        img.data[4 * p + c] = Math.round(Math.min(1, Math.max(0, v)) * 255);
      }
      img.data[4 * p + 3] = 255;
    }
    canvas.getContext("2d").putImageData(img, 0, 0);
  }
  function drawColorbar(canvas, st) {
    const stops = state.config.colormaps[st.cmap], n = canvas.height;
    const img = canvas.getContext("2d").createImageData(1, n);
    for (let r = 0; r < n; r++) {          // top = the largest value
      const col = colorAt(stops, n === 1 ? 1 : 1 - r / (n - 1));
      for (let c = 0; c < 3; c++) img.data[4 * r + c] = Math.round(col[c] * 255);
      img.data[4 * r + 3] = 255;
    }
    canvas.getContext("2d").putImageData(img, 0, 0);
  }

  // -- the picture ----------------------------------------------------------------
  async function decodePicture(blob) {
    const url = URL.createObjectURL(blob);
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = state.W; c.height = state.H;
      const ctx = c.getContext("2d");
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(img, 0, 0, state.W, state.H);
      const d = ctx.getImageData(0, 0, state.W, state.H).data, rgb = new Float32Array(state.W * state.H * 3);
      for (let p = 0; p < state.W * state.H; p++) for (let c = 0; c < 3; c++) rgb[3 * p + c] = d[4 * p + c] / 255;
      return rgb;
    } finally {
      URL.revokeObjectURL(url);
    }
  }
  function drawPicture() {
    const canvas = $("picture"), ctx = canvas.getContext("2d");
    if (!state.picture) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
    const img = ctx.createImageData(state.W, state.H);
    for (let p = 0; p < state.W * state.H; p++) {
      for (let c = 0; c < 3; c++) img.data[4 * p + c] = Math.round(state.picture[3 * p + c] * 255);
      img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }
  async function setFile(blob, name) {
    state.file = blob;
    state.fileName = name || "image";
    state.target = null;
    state.picture = null;
    state.last = window.dconnxLast = null;      // nothing of the previous image stays on the page
    for (const id of ["classes", "streams", "maps", "maps-for"]) $(id).replaceChildren();
    $("download-panel").disabled = true;
    $("download-maps").disabled = true;
    try {
      state.picture = await decodePicture(blob);
    } catch (e) {
      setStatus("the browser cannot show this file; the server decides whether it is an image");
    }
    drawPicture();
    clearTimeout(state.timer);
    requestExplain();
  }

  // -- requests -----------------------------------------------------------------
  function form() {
    const f = new FormData();
    f.append("image", state.file, state.fileName);
    if (state.target !== null) f.append("target", String(state.target));
    if (state.config.accepts_alpha) f.append("alpha", String(state.alpha));
    if (state.dense && state.region) f.append("region", state.region.join(","));
    f.append("format", "array");
    return f;
  }
  function scheduleExplain() {
    clearTimeout(state.timer);
    state.timer = setTimeout(requestExplain, DEBOUNCE_MS);
  }
  async function requestExplain() {
    if (!state.file) return;
    const seq = ++state.seq;
    if (state.controller) state.controller.abort();     // an answer for older settings is not drawn
    const controller = new AbortController();
    state.controller = controller;
    const sent = { target: state.target, alpha: state.alpha, region: state.region ? state.region.slice() : null };
    setStatus("explaining…");
    const t0 = performance.now();
    window.dconnxRequests += 1;
    let response, body;
    try {
      response = await fetch("/explain", { method: "POST", body: form(), signal: controller.signal });
      body = await response.json().catch(() => null);
    } catch (e) {
      if (e.name === "AbortError") return;
      showError("cannot reach the server: " + e.message);
      setStatus("");
      return;
    }
    if (seq !== state.seq) return;
    if (!response.ok) {
      showError(serverMessage(response, body));
      setStatus("");
      return;
    }
    clearError();
    receive(body, performance.now() - t0, sent);
  }
  function receive(body, ms, sent) {
    const maps = {};
    for (const [m, enc] of Object.entries(body.maps)) {
      const data = decodeArray(enc), shape = enc.shape.slice(1);
      maps[m] = { shape, data: data.subarray(0, shape[0] * shape[1]) };
    }
    const one = (v) => (Array.isArray(v) ? v[0] : null);
    const scores = body.scores || body.logits;     // a dense model's classes: their region sums
    state.last = {
      model: body.model, image: state.fileName, target: body.target[0], alpha: body.alpha,
      requested: sent, logits: body.logits ? body.logits[0] : null, scores: scores[0],
      region: body.region || null, g: one(body.g), h: one(body.h), f: one(body.f),
      maps, ms: Math.round(ms),
    };
    window.dconnxLast = state.last;
    renderClasses();
    renderStreams();
    renderMaps();
    $("download-panel").disabled = false;
    $("download-maps").disabled = false;
    setStatus(`explained class ${className(state.last.target)} in ${state.last.ms} ms`);
    window.dconnxUpdates += 1;
  }

  // -- drawing the answer -----------------------------------------------------------
  function className(k) {
    const names = state.config.class_names;
    return names ? `${names[k]} (${k})` : String(k);
  }
  function renderClasses() {
    const list = $("classes"), logits = state.last.scores, dense = state.dense;
    const top = Math.max(...logits), exps = logits.map((v) => Math.exp(v - top));
    const total = exps.reduce((a, b) => a + b, 0);
    const order = logits.map((v, k) => k).sort((a, b) => logits[b] - logits[a]).slice(0, 5);
    // a dense model's region sums are no logits of one softmax: shown as they are
    const describe = (k) => (dense ? `region sum ${fmt3g(logits[k])}`
      : `${(exps[k] / total).toFixed(3)} · logit ${fmt3g(logits[k])}`);
    const spoken = (k) => (dense ? `region sum ${fmt3g(logits[k])}`
      : `softmax ${(exps[k] / total).toFixed(3)}, logit ${fmt3g(logits[k])}`);
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.cls : undefined;
    list.replaceChildren();
    for (const k of order) {
      const li = document.createElement("li"), b = document.createElement("button");
      b.type = "button";
      b.dataset.cls = String(k);
      b.setAttribute("aria-pressed", String(k === state.last.target));
      b.disabled = !state.config.accepts_target;
      const name = document.createElement("span"), score = document.createElement("span");
      name.textContent = className(k);
      score.textContent = describe(k);
      b.append(name, score);
      b.setAttribute("aria-label", `explain class ${className(k)}: ${spoken(k)}`);
      b.addEventListener("click", () => { state.target = k; clearTimeout(state.timer); requestExplain(); });
      li.append(b);
      list.append(li);
      if (focused === String(k)) b.focus();
    }
  }
  function renderStreams() {
    const dl = $("streams"), L = state.last, rows = [["class", className(L.target)]];
    if (L.f !== null) {
      rows.push(["f = g − h", fmt3g(L.f)], ["g", fmt3g(L.g)], ["h", fmt3g(L.h)]);
    } else {
      rows.push([state.dense ? "region sum" : "logit", fmt3g(L.scores[L.target])]);
    }
    if (L.alpha !== null && L.alpha !== undefined) rows.push(["α", String(L.alpha)]);
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      dd.id = "stream-" + k.split(" ")[0].replace("α", "alpha");
      if (k === "region sum") dd.id = "stream-region";
      dl.append(dt, dd);
    }
  }
  function renderMaps() {
    if (!state.last) return;
    const L = state.last;
    const box = L.requested.region;
    $("maps-for").textContent = `for class ${className(L.target)}` +
      (L.alpha !== null && L.alpha !== undefined ? `, α ${L.alpha}` : "") +
      (state.dense ? (box ? `, summed over the box ${box.join(",")}` : ", summed over every position") : "");
    const figures = $("maps");
    figures.replaceChildren();
    for (const [m, map] of Object.entries(state.last.maps)) {
      const heat = resize(map.data, map.shape[0], map.shape[1], state.H, state.W);
      const st = styleOf(m, map.data);
      const fig = document.createElement("figure"), cap = document.createElement("figcaption");
      fig.className = "map";
      fig.dataset.method = m;
      cap.textContent = m;
      const row = document.createElement("div");
      row.className = "map-row";
      const canvas = document.createElement("canvas");
      canvas.className = "overlay";
      canvas.width = state.W; canvas.height = state.H;
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `${m} map over the image, ${st.cmap} colormap from ` +
        `${tickLabel(st.vmin)} to ${tickLabel(st.vmax)}`);
      drawOverlay(canvas, heat, st, state.strength);
      const bar = document.createElement("canvas");
      bar.className = "colorbar";
      bar.width = 1; bar.height = 256;
      bar.setAttribute("aria-hidden", "true");
      drawColorbar(bar, st);
      const tk = document.createElement("div");
      tk.className = "ticks";
      for (const v of ticks(st)) {
        const s = document.createElement("span");
        s.textContent = tickLabel(v);
        tk.append(s);
      }
      const wrap = document.createElement("div");
      wrap.className = "overlay-wrap";
      wrap.append(canvas);
      if (box) {                            // the region the map explains, as on the image
        const rect = document.createElement("div");
        rect.className = "region-rect";
        placeRect(rect, box);
        wrap.append(rect);
      }
      row.append(wrap, bar, tk);
      fig.append(cap, row);
      figures.append(fig);
    }
  }

  // -- the region box of a dense model -------------------------------------------------
  const REGION_INPUTS = ["region-x0", "region-y0", "region-x1", "region-y1"];
  function placeRect(el, box) {          // a box of model-input pixels, in % of the element's parent
    const [x0, y0, x1, y1] = box;
    el.style.left = `${(100 * x0) / state.W}%`;
    el.style.top = `${(100 * y0) / state.H}%`;
    el.style.width = `${(100 * (x1 - x0)) / state.W}%`;
    el.style.height = `${(100 * (y1 - y0)) / state.H}%`;
  }
  function showRegion() {
    const rect = $("region-rect"), box = state.region;
    rect.hidden = !box;
    if (box) placeRect(rect, box);
    const shown = box || [0, 0, state.W, state.H];
    REGION_INPUTS.forEach((id, i) => {
      $(id).value = String(shown[i]);
      $(id).removeAttribute("aria-invalid");
    });
    $("region-state").textContent = box ? `box ${box.join(",")}` : "every position";
  }
  function setRegion(box) {               // null: every position
    state.region = box;
    showRegion();
    if (state.file) scheduleExplain();
  }
  function regionFromInputs() {
    const v = REGION_INPUTS.map((id) => Number($(id).value));
    const [x0, y0, x1, y1] = v;
    const ok = REGION_INPUTS.every((id) => $(id).value !== "") &&
      v.every(Number.isInteger) && x0 >= 0 && y0 >= 0 && x0 < x1 && y0 < y1 && x1 <= state.W && y1 <= state.H;
    if (!ok) {                             // nothing is sent until the box is valid again
      REGION_INPUTS.forEach((id) => $(id).setAttribute("aria-invalid", "true"));
      $("region-state").textContent = `not a box: need integers 0 ≤ x0 < x1 ≤ ${state.W}, ` +
        `0 ≤ y0 < y1 ≤ ${state.H}`;
      return;
    }
    state.region = v;
    REGION_INPUTS.forEach((id) => $(id).removeAttribute("aria-invalid"));
    $("region-rect").hidden = false;
    placeRect($("region-rect"), v);
    $("region-state").textContent = `box ${v.join(",")}`;
    if (state.file) scheduleExplain();
  }
  function pixelAt(e) {                   // the model-input pixel under the pointer
    const r = $("picture").getBoundingClientRect();
    const x = Math.floor(((e.clientX - r.left) / r.width) * state.W);
    const y = Math.floor(((e.clientY - r.top) / r.height) * state.H);
    return [Math.min(state.W - 1, Math.max(0, x)), Math.min(state.H - 1, Math.max(0, y))];
  }
  function dragBox(a, b) {                // every pixel between the two corners, both included
    return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]) + 1, Math.max(a[1], b[1]) + 1];
  }
  function wireRegion() {
    const canvas = $("picture");
    $("picture-wrap").classList.add("dense");
    $("region-box").hidden = false;
    $("drop-help").textContent = "Drop an image here, or press Enter to choose a file; drag on the image to draw the region";
    // on the image a click or drag draws the box (the rest of the drop zone still opens the chooser)
    canvas.addEventListener("click", (e) => { if (state.file) e.stopPropagation(); });
    canvas.addEventListener("pointerdown", (e) => {
      if (!state.file || e.button !== 0) return;
      e.preventDefault();
      canvas.setPointerCapture(e.pointerId);
      state.drag = pixelAt(e);
      state.region = dragBox(state.drag, state.drag);
      showRegion();
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!state.drag) return;
      state.region = dragBox(state.drag, pixelAt(e));
      showRegion();
    });
    const finish = (e) => {
      if (!state.drag) return;
      const box = dragBox(state.drag, pixelAt(e));
      state.drag = null;
      setRegion(box);
    };
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
    for (const id of REGION_INPUTS) {
      $(id).max = String(id.endsWith("0") ? (id.includes("x") ? state.W - 1 : state.H - 1)
        : (id.includes("x") ? state.W : state.H));
      $(id).addEventListener("input", regionFromInputs);
    }
    $("region-clear").addEventListener("click", () => setRegion(null));
    showRegion();
  }

  // -- downloads ------------------------------------------------------------------
  function save(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }
  function stem() { return (state.fileName || "image").replace(/\.[^.]*$/, ""); }
  async function downloadPanel() {
    if (!state.file) return;
    const r = await fetch(`/panel?strength=${state.strength}`, { method: "POST", body: form() })
      .catch((e) => { showError("cannot reach the server: " + e.message); return null; });
    if (!r) return;
    if (!r.ok) { showError(serverMessage(r, await r.json().catch(() => null))); return; }
    save(await r.blob(), `${stem()}.panel.png`);
  }
  function downloadMaps() {
    const L = state.last;
    if (!L) return;
    const names = state.config.class_names;
    const doc = {
      model: L.model, image: L.image, target: L.target, class_name: names ? names[L.target] : null,
      alpha: L.alpha, logits: L.logits, g: L.g, h: L.h, f: L.f, maps: {},
    };
    if (state.dense) { doc.region_sums = L.scores; doc.region = L.requested.region; }
    for (const [m, map] of Object.entries(L.maps)) doc.maps[m] = { shape: map.shape, values: Array.from(map.data) };
    save(new Blob([JSON.stringify(doc)], { type: "application/json" }), `${stem()}.maps.json`);
  }

  // -- wiring -----------------------------------------------------------------------
  function wire() {
    const drop = $("drop"), file = $("file");
    drop.addEventListener("click", () => file.click());
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); }
    });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const f = e.dataTransfer.files[0];
      if (f) setFile(f, f.name);
    });
    file.addEventListener("change", () => { if (file.files[0]) setFile(file.files[0], file.files[0].name); });
    $("alpha").addEventListener("input", (e) => {
      state.alpha = Number(e.target.value);
      $("alpha-value").textContent = e.target.value;
      scheduleExplain();
    });
    let frame = 0;
    $("strength").addEventListener("input", (e) => {
      state.strength = Number(e.target.value);
      $("strength-value").textContent = e.target.value;
      cancelAnimationFrame(frame);
      frame = requestAnimationFrame(renderMaps);
    });
    $("download-panel").addEventListener("click", downloadPanel);
    $("download-maps").addEventListener("click", downloadMaps);
  }
  async function init() {
    wire();
    try {
      const [model, config] = await Promise.all([getJSON("/model"), getJSON("/page/config")]);
      state.model = model;
      state.config = config;
      $("model-name").textContent = config.model;
      $("model-info").textContent = `${model.provider} · input ${JSON.stringify(model.input_shape)} · ` +
        `methods ${config.methods.join(", ") || "none"}`;
      if (!model.image_input) throw new Error("this model does not take images; the page needs an image model");
      state.H = model.image_input.height;
      state.W = model.image_input.width;
      $("picture").width = state.W;
      $("picture").height = state.H;
      state.strength = config.overlay_strength;
      $("strength").value = String(config.overlay_strength);
      $("strength-value").textContent = String(config.overlay_strength);
      $("alpha-box").hidden = !config.accepts_alpha;
      state.dense = Boolean(config.dense);
      if (state.dense) {
        $("classes-title").textContent = "Top classes by region sum";
        wireRegion();
      }
      if (config.accepts_alpha && config.alpha_default !== null && config.alpha_default !== undefined) {
        state.alpha = Number(config.alpha_default);
        $("alpha").value = String(state.alpha);
        $("alpha-value").textContent = $("alpha").value;
      }
      const ex = $("examples");
      $("examples-box").hidden = !config.examples.length;
      for (const name of config.examples) {
        const b = document.createElement("button"), img = document.createElement("img");
        b.type = "button";
        b.dataset.example = name;
        img.src = `/examples/${encodeURIComponent(name)}`;
        img.alt = `example: ${name.replace(/\.png$/, "")}`;
        b.append(img);
        b.addEventListener("click", async () => {
          const r = await fetch(img.src);
          if (!r.ok) { showError(serverMessage(r, await r.json().catch(() => null))); return; }
          setFile(await r.blob(), name);
        });
        ex.append(b);
      }
      window.dconnxReady = true;
    } catch (e) {
      showError(e.message);
    }
  }
  init();
})();
