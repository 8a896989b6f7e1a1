// loopgpt playground logic (index.html); served at /static/playground.js. No inline script: the page's
// Content-Security-Policy allows scripts from this server only.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { model: null, evalLoss: {}, runs: [] };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  // The server answers errors OpenAI-shaped: {"error": {"message", ...}}; fall back to the status line.
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON: use the status line */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModels() {
  const status = $("status");
  try {
    const response = await fetch("/v1/models", { headers: headers(false) });
    if (!response.ok) {
      status.textContent = await errorMessage(response);
      status.className = "status bad";
      if (response.status === 401) $("key-box").open = true;
      return;
    }
    const model = ((await response.json()).data || [])[0];
    if (!model || !model.loops) {
      status.textContent = "the server lists no model";
      status.className = "status bad";
      return;
    }
    state.model = model;
    state.evalLoss = model.eval_loss || {};
    $("model-id").textContent = model.id;
    status.textContent = "ready";
    status.className = "status ok";
    const loops = model.loops;
    for (const id of ["loops", "loops-b"]) {
      $(id).min = loops.min; $(id).max = loops.max; $(id).value = loops.default;
    }
    // A sensible comparison: the cheapest depth against the default one.
    $("loops-b").value = loops.default > loops.min ? loops.min : Math.min(loops.max, loops.default + 1);
    $("loops-hint").textContent =
      `1–${loops.max} allowed · trained up to ${loops.trained} · beyond that the last learned gate is reused`;
    showLoops();
  } catch (e) {
    status.textContent = "server unreachable";
    status.className = "status bad";
  }
}

function showLoops() {
  const a = Number($("loops").value), b = Number($("loops-b").value), compare = $("compare").checked;
  $("loops-value").textContent = a;
  $("loops-b-value").textContent = b;
  $("loops-b-row").hidden = !compare;
  const rows = Object.entries(state.evalLoss).map(([n, loss]) => [Number(n), Number(loss)])
    .sort((x, y) => x[0] - y[0]);
  const box = $("evals");
  box.replaceChildren();
  if (!rows.length) { box.textContent = "no eval losses in this checkpoint"; return; }
  const losses = rows.map((r) => r[1]);
  const lo = Math.min(...losses), hi = Math.max(...losses);
  const head = (text) => { const s = document.createElement("span"); s.className = "n"; s.textContent = text;
    return s; };
  box.append(head("loops"), head("eval loss"), head(""));
  for (const [n, loss] of rows) {
    const sel = n === a ? "sel-a" : (compare && n === b ? "sel-b" : "");
    const cells = [document.createElement("span"), document.createElement("span"), document.createElement("div")];
    cells[0].textContent = n; cells[0].className = "n " + sel;
    cells[1].textContent = loss.toFixed(3); cells[1].className = sel;
    // Lower loss draws a longer bar: the bar is "how much better than the worst depth" plus a floor.
    const frac = hi > lo ? (hi - loss) / (hi - lo) : 1;
    cells[2].className = "bar " + sel;
    cells[2].style.width = `${Math.round(15 + 85 * frac)}%`;
    cells[0].dataset.loops = n;
    box.append(...cells);
  }
  const aLoss = state.evalLoss[String(a)];
  $("loops-a-tag").textContent = aLoss === undefined ? "· not evaluated" : `· eval loss ${Number(aLoss).toFixed(3)}`;
}

function makePane(loops, which) {
  const node = $("pane-template").content.firstElementChild.cloneNode(true);
  node.classList.add(which);
  node.dataset.loops = loops;
  const modes = [$("auto").checked ? `loops auto ≤ ${loops}` : `loops ${loops}`];
  if ($("speculative").checked && !$("auto").checked) modes.push("speculative");
  node.querySelector(".tag").textContent = modes.join(" · ");
  node.querySelector(".prompt").textContent = $("prompt").value;
  return node;
}

function setStat(pane, name, value) { pane.querySelector(`[data-stat="${name}"]`).textContent = value; }

function formatSeconds(s) { return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`; }

async function* sseData(body) {
  // Server-Sent Events: lines end in \n, \r\n or \r (sse-starlette sends \r\n); a blank line ends an event.
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = lines.pop();  // an unfinished line (or a lone \r that may be half of \r\n) waits for more
    for (const line of lines) {
      if (line === "" || line === "\r") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
  }
  if (data.length) yield data.join("\n");
}

async function runOne(pane, loops, body, controller) {
  const text = pane.querySelector(".completion"), pre = pane.querySelector(".text");
  const started = performance.now();
  let firstAt = null, tokens = 0;
  pre.classList.add("running");
  try {
    // Adaptive depth: the slider value is the budget (max_loops) and the query asks for loops=auto.
    const auto = $("auto").checked;
    const sent = auto ? { ...body, max_loops: loops } : body;
    const response = await fetch(`/generate?loops=${auto ? "auto" : loops}`, {
      method: "POST", headers: headers(true), body: JSON.stringify(sent), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const payload of sseData(response.body)) {
      if (payload === "[DONE]") break;
      const event = JSON.parse(payload);
      if (event.error) throw new Error(event.error.message || "the server ended the stream with an error");
      if (event.text !== undefined && event.token_id !== undefined) {
        const now = performance.now();
        if (firstAt === null) { firstAt = now; setStat(pane, "ttft", formatSeconds((now - started) / 1000)); }
        tokens += 1;
        text.textContent += event.text;
        setStat(pane, "tokens", tokens);
        // Decode rate: tokens after the first, over the time since the first arrived.
        if (tokens > 1) setStat(pane, "tps", ((tokens - 1) / ((now - firstAt) / 1000)).toFixed(1));
      }
      if (event.finish_reason) finish(pane, event);
    }
  } catch (e) {
    if (e.name === "AbortError") setStat(pane, "finish", "stopped");
    else pane.querySelector(".error").textContent = e.message;
  } finally {
    pre.classList.remove("running");
    pane.dataset.done = "true";
  }
}

function finish(pane, event) {
  setStat(pane, "finish", event.finish_reason);
  if (typeof event.loops_per_token === "number") setStat(pane, "lpt", event.loops_per_token.toFixed(2));
  const parts = [];
  const t = event.timing || {};
  if (t.ttft_s !== undefined) parts.push(`ttft ${formatSeconds(t.ttft_s)}`);
  if (t.tokens_per_s !== undefined) parts.push(`${Number(t.tokens_per_s).toFixed(1)} tok/s`);
  if (t.e2e_s !== undefined) parts.push(`e2e ${formatSeconds(t.e2e_s)}`);
  if (event.usage) parts.push(`prompt ${event.usage.prompt_tokens} + completion ${event.usage.completion_tokens}`);
  for (const [k, v] of Object.entries(event.quality || {})) {
    if (typeof v === "number") parts.push(`${k} ${v.toFixed(3)}`);
  }
  pane.querySelector(".server").textContent = parts.length ? "server: " + parts.join(" · ") : "";
}

function readNumber(id, fallback) {
  const raw = $(id).value.trim();
  return raw === "" ? fallback : Number(raw);
}

async function generate() {
  if (state.runs.length) return;
  $("page-error").textContent = "";
  if (!state.model) await loadModels();
  if (!state.model) { $("page-error").textContent = "the server has no model ready (see the status above)"; return; }
  const compare = $("compare").checked;
  const loopsList = compare ? [Number($("loops").value), Number($("loops-b").value)] : [Number($("loops").value)];
  // Both sides of a comparison share one seed, so any difference comes from the loop count.
  const seed = readNumber("seed", compare ? Math.floor(Math.random() * 2 ** 31) : undefined);
  const body = { prompt: $("prompt").value, max_tokens: readNumber("max-tokens", 128),
                 temperature: readNumber("temperature", 0.8), seed, stream: true,
                 speculative: $("speculative").checked ? "auto" : "off" };
  const outputs = $("outputs");
  outputs.className = "outputs" + (compare ? " compare" : "");
  outputs.replaceChildren();
  $("generate").disabled = true; $("stop").disabled = false;
  const runs = loopsList.map((loops, i) => {
    const pane = makePane(loops, i === 0 ? "a" : "b");
    outputs.append(pane);
    const controller = new AbortController();
    return { controller, done: runOne(pane, loops, body, controller) };
  });
  state.runs = runs;
  await Promise.all(runs.map((r) => r.done));
  state.runs = [];
  $("generate").disabled = false; $("stop").disabled = true;
}

function stop() { for (const run of state.runs) run.controller.abort(); }

$("loops").addEventListener("input", showLoops);
$("loops-b").addEventListener("input", showLoops);
$("compare").addEventListener("change", showLoops);
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("api-key").addEventListener("change", loadModels);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
loadModels();
