"""The single self-contained page served at `/`: inline CSS and JavaScript, nothing fetched from elsewhere.

`page_html(bodies)` makes it when an app is made: its generator menu lists the registered kinds, and its sampling
controls are the settings the request bodies take (binlat.sampling, read off the kinds' Settings), each with its
type, its bounds or choices where the Settings declare them, its help, the kinds that read it and the model's value
for the chosen generator (from /v1/models), so a kind registered with a setting of its own shows it with no edit
here. Query parameters prefill the form (prompt, generator, seed, size, n, and each setting by its name, its short
name or a CLI alias: steps, cfg, ...); `autorun=1` generates once the page has loaded."""

from __future__ import annotations

import json
import re
from html import escape
from typing import Any

from ..registry import generator_kinds
from ..sampling import Setting, settings
from .schemas import RequestBodies

_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>binlat</title>
<style>
  :root { --fg: #1d2126; --muted: #68707a; --line: #d9dde2; --accent: #2f5fd0; --bad: #b3261e; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: var(--bg); }
  header { padding: 14px 22px; background: #fff; border-bottom: 1px solid var(--line); display: flex;
           align-items: baseline; gap: 14px; flex-wrap: wrap; }
  header h1 { margin: 0; font-size: 20px; }
  #model-info { color: var(--muted); font-size: 13px; }
  #model-info.untrained { color: #8a5a00; }
  main { display: grid; grid-template-columns: minmax(280px, 360px) 1fr; gap: 20px; padding: 20px 22px; }
  @media (max-width: 800px) { main { grid-template-columns: 1fr; } }
  section.panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
  section.panel + section.panel { margin-top: 16px; }
  h2 { font-size: 15px; margin: 0 0 10px; }
  label { display: block; font-size: 12px; color: var(--muted); margin: 8px 0 3px; }
  textarea, input, select { width: 100%; font: inherit; padding: 6px 8px; border: 1px solid var(--line);
                            border-radius: 5px; background: #fff; color: var(--fg); }
  textarea { min-height: 70px; resize: vertical; }
  .row { display: grid; grid-template-columns: 1fr 1fr; gap: 0 10px; }
  button { font: inherit; padding: 8px 14px; border-radius: 6px; border: 1px solid var(--accent);
           background: var(--accent); color: #fff; cursor: pointer; }
  button.secondary { background: #fff; color: var(--accent); }
  button:disabled { opacity: .55; cursor: progress; }
  .actions { margin-top: 12px; display: flex; gap: 10px; align-items: center; }
  #status { font-size: 13px; color: var(--muted); min-height: 1.4em; margin: 0 0 10px; }
  #status.error { color: var(--bad); }
  #gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 14px;
             align-content: start; }
  #gallery:empty::before { content: "Generated images appear here."; color: var(--muted); grid-column: 1 / -1; }
  figure.card { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
  figure.card img { display: block; width: 100%; height: auto; image-rendering: pixelated;
                    background: #eee; }
  figcaption { padding: 8px 10px; font-size: 13px; }
  figcaption .prompt { word-break: break-word; }
  figcaption .meta { color: var(--muted); font-size: 12px; margin: 3px 0 6px; }
  figcaption .links { display: flex; gap: 12px; font-size: 12px; }
  figcaption a, figcaption .link { color: var(--accent); cursor: pointer; text-decoration: none;
                                   background: none; border: 0; padding: 0; font: inherit; }
  #edit-preview { max-width: 96px; max-height: 96px; display: none; margin-top: 6px; border: 1px solid var(--line); }
</style>
</head>
<body>
<header>
  <h1>binlat</h1>
  <span id="model-info">loading model information…</span>
</header>
<main>
  <div>
    <section class="panel" aria-labelledby="gen-title">
      <h2 id="gen-title">Generate</h2>
      <form id="gen-form" autocomplete="off">
        <label for="prompt">Prompt</label>
        <textarea id="prompt" name="prompt" placeholder="a red circle above a blue square" required></textarea>
        <div class="row">
          <div><label for="generator">Generator</label>
            <select id="generator" name="generator"><!-- generator options --></select></div>
<!-- sampling controls -->
          <div><label for="seed">Seed (blank: random)</label>
            <input id="seed" name="seed" type="number" min="0" step="1" placeholder="random"></div>
          <div><label for="size">Size (px)</label>
            <input id="size" name="size" type="number" min="16" step="16" value="512"></div>
          <div><label for="n">Images</label>
            <input id="n" name="n" type="number" min="1" max="8" step="1" value="1"></div>
        </div>
        <div class="actions">
          <button id="generate" type="submit">Generate</button>
          <span style="font-size:12px;color:var(--muted)">Ctrl+Enter</span>
        </div>
      </form>
    </section>
    <section class="panel" aria-labelledby="edit-title">
      <h2 id="edit-title">Edit an image</h2>
      <form id="edit-form" autocomplete="off">
        <label for="edit-image">Image</label>
        <input id="edit-image" name="image" type="file" accept="image/*">
        <img id="edit-preview" alt="image to edit">
        <label for="edit-prompt">New prompt</label>
        <input id="edit-prompt" name="prompt" type="text" placeholder="the same scene, but green">
        <label for="strength">Strength <span id="strength-value">0.6</span> (0 keeps the image, 1 ignores it)</label>
        <input id="strength" name="strength" type="range" min="0" max="1" step="0.05" value="0.6">
        <div class="actions">
          <button id="edit" type="submit" class="secondary">Edit</button>
          <span style="font-size:12px;color:var(--muted)">uses the sampling settings above</span>
        </div>
      </form>
    </section>
  </div>
  <div>
    <div id="status" role="status" aria-live="polite"></div>
    <div id="gallery" aria-label="results"></div>
  </div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let editSource = null;  // a Blob chosen from the gallery ("edit this")
let busy = false;

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function setBusy(on) {
  busy = on;
  $("generate").disabled = on;
  $("edit").disabled = on;
  document.body.dataset.state = on ? "busy" : "idle";
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  if (!Number.isFinite(value)) throw new Error(`${id.replace("_", " ")} must be a number`);
  return value;
}

// The sampling controls: one per setting of the registered kinds, made from their Settings (data-setting: its
// name; data-type: int, float, bool or text; data-kinds: the kinds that read it; data-edit: /v1/edit takes it).
const settingControls = () => [...document.querySelectorAll("[data-setting]")];

function settingValue(el) {
  const raw = el.value.trim();
  if (raw === "") return undefined;  // left blank: the model's setting
  const type = el.dataset.type;
  if (type === "bool") return raw === "true";
  if (type === "text") return raw;
  const value = Number(raw);
  if (!Number.isFinite(value) || (type === "int" && !Number.isInteger(value))) {
    throw new Error(`${el.dataset.label} must be ${type === "int" ? "an integer" : "a number"}`);
  }
  return value;
}

// The request's settings (for an edit, those /v1/edit takes), then its seed, size and count.
function sampling(forEdit) {
  const body = {};
  for (const el of settingControls()) {
    if (!forEdit || el.dataset.edit === "1") body[el.dataset.setting] = settingValue(el);
  }
  Object.assign(body, {
    seed: numberField("seed", (v) => parseInt(v, 10)),
    size: numberField("size", (v) => parseInt(v, 10)),
    n: numberField("n", (v) => parseInt(v, 10)),
  });
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

function base64ToBlob(b64) {
  const bytes = atob(b64);
  const arr = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) arr[i] = bytes.charCodeAt(i);
  return new Blob([arr], { type: "image/png" });
}

function addCard(image, seconds, kind) {
  const fig = document.createElement("figure");
  fig.className = "card";
  const src = "data:image/png;base64," + image.png_base64;
  const img = document.createElement("img");
  img.className = "result";
  img.src = src;
  img.alt = image.prompt;
  img.width = image.width;
  img.height = image.height;
  img.dataset.seed = String(image.seed);
  const cap = document.createElement("figcaption");
  const prompt = document.createElement("div");
  prompt.className = "prompt";
  prompt.textContent = image.prompt;
  const meta = document.createElement("div");
  meta.className = "meta";
  const parts = [kind, `seed ${image.seed}`, `${image.width}×${image.height}`];
  if (image.generator) parts.push(image.generator);
  if (image.strength !== undefined) parts.push(`strength ${image.strength}`);
  parts.push(`${seconds.toFixed(2)} s`);
  meta.textContent = parts.join(" · ");
  const links = document.createElement("div");
  links.className = "links";
  const download = document.createElement("a");
  download.className = "download";
  download.href = src;
  download.download = `binlat-${kind}-seed${image.seed}.png`;
  download.textContent = "Download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.className = "link";
  reuse.textContent = "Use seed";
  reuse.addEventListener("click", () => { $("seed").value = image.seed; $("prompt").value = image.prompt; });
  const editThis = document.createElement("button");
  editThis.type = "button";
  editThis.className = "link";
  editThis.textContent = "Edit this";
  editThis.addEventListener("click", () => {
    editSource = base64ToBlob(image.png_base64);
    $("edit-image").value = "";
    $("edit-preview").src = src;
    $("edit-preview").style.display = "block";
    $("edit-prompt").value = image.prompt;
    $("edit-prompt").focus();
  });
  links.append(download, reuse, editThis);
  cap.append(prompt, meta, links);
  fig.append(img, cap);
  $("gallery").prepend(fig);
}

async function callApi(path, init) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error("cannot reach the server: " + e.message);
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const why = data && data.error ? data.error : `HTTP ${response.status}`;
    throw new Error(response.status === 429 ? "server busy, try again in a moment: " + why : why);
  }
  return data;
}

function showResults(data, kind) {
  const each = data.images.length ? data.timing_s / data.images.length : data.timing_s;
  for (const image of [...data.images].reverse()) addCard(image, each, kind);  // newest batch first, in order
  setStatus(`${data.images.length} image(s) in ${data.timing_s.toFixed(2)} s` +
            (data.queue_s > 0.05 ? ` (waited ${data.queue_s.toFixed(2)} s)` : ""), false);
}

async function generate() {
  if (busy) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) { setStatus("Type a prompt first.", true); $("prompt").focus(); return; }
  let body;
  try { body = Object.assign({ prompt, generator: $("generator").value }, sampling()); }
  catch (e) { setStatus(e.message, true); return; }
  setBusy(true);
  setStatus("generating…", false);
  try {
    const data = await callApi("/v1/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    showResults(data, "generate");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    setBusy(false);
  }
}

async function editImage() {
  if (busy) return;
  const file = $("edit-image").files[0] || editSource;
  if (!file) { setStatus("Choose an image to edit (or use “Edit this” on a result).", true); return; }
  const prompt = $("edit-prompt").value;
  if (!prompt.trim()) { setStatus("Type the new prompt for the edit.", true); return; }
  let params;
  try { params = sampling(true); } catch (e) { setStatus(e.message, true); return; }
  const form = new FormData();
  form.append("image", file, file.name || "image.png");
  form.append("prompt", prompt);
  form.append("strength", $("strength").value);
  for (const [k, v] of Object.entries(params)) form.append(k, String(v));
  setBusy(true);
  setStatus("editing…", false);
  try {
    showResults(await callApi("/v1/edit", { method: "POST", body: form }), "edit");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    setBusy(false);
  }
}

// Blank sampling fields take the model's tuned settings; their placeholders show what those are for the chosen
// generator, or that it does not read the setting.
let samplingDefaults = {};
function showSamplingDefaults() {
  const kind = $("generator").value;
  const tuned = samplingDefaults[kind] || {};
  for (const el of settingControls()) {
    const reads = el.dataset.kinds.split(" ").includes(kind);
    const value = tuned[el.dataset.setting];
    const text = !reads ? `not read by ${kind}` : value === undefined ? "model's" : String(value);
    if (el.tagName === "SELECT") el.options[0].textContent = reads ? `model's (${text})` : text;
    else el.placeholder = text;
  }
}

async function loadModel() {
  try {
    const info = await callApi("/v1/models", {});
    const el = $("model-info");
    const kind = info.trained ? (info.description || "trained model") :
      "randomly initialised model: its images are noise";
    el.textContent = `${kind} · ${info.image_size}px · ${info.num_tokens} tokens × ${info.num_bits} bits`;
    el.className = info.trained ? "" : "untrained";
    const chosen = $("generator").value;
    $("generator").replaceChildren(...info.generators.map(k => new Option(k, k)));  // the model's kinds
    if (info.generators.includes(chosen)) $("generator").value = chosen;
    const size = $("size");
    size.step = info.size_multiple;
    size.min = info.size_multiple;
    size.max = info.limits.max_size;
    if (!new URLSearchParams(location.search).has("size")) size.value = info.image_size;
    const steps = document.querySelector('[data-setting="num_steps"]');
    if (steps) steps.max = info.limits.max_steps;
    $("n").max = info.limits.max_n;
    $("prompt").maxLength = info.limits.max_prompt_chars;
    $("edit").disabled = !info.can_edit;
    samplingDefaults = info.sampling || {};
    showSamplingDefaults();
  } catch (e) {
    setStatus("could not load model information: " + e.message, true);
  }
}

function applyQuery() {
  const q = new URLSearchParams(location.search);
  const fields = { prompt: "prompt", generator: "generator", seed: "seed", size: "size", n: "n" };
  for (const el of settingControls()) for (const name of el.dataset.params.split(" ")) fields[name] = el.id;
  for (const [param, id] of Object.entries(fields)) if (q.has(param)) $(id).value = q.get(param);
  return q.get("autorun") === "1";
}

$("gen-form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
$("generator").addEventListener("change", showSamplingDefaults);
$("edit-form").addEventListener("submit", (e) => { e.preventDefault(); editImage(); });
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
});
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("edit-image").addEventListener("change", () => {
  const file = $("edit-image").files[0];
  editSource = null;
  if (file) { $("edit-preview").src = URL.createObjectURL(file); $("edit-preview").style.display = "block"; }
});

(async () => {
  setBusy(false);
  const autorun = applyQuery();
  await loadModel();
  if (autorun) await generate();
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""


BLANK = "model's"  # what a blank control says before the model's settings are known
_FIXED_IDS = frozenset(re.findall(r'id="([^"]+)"', _TEMPLATE))  # the page's own ids, which no control may take


def page_html(bodies: RequestBodies) -> str:
    """The page, with a control for each sampling setting `bodies.generate` takes, marked for editing where
    `bodies.edit` takes it too (the API's own bodies, so the form sends what they take)."""
    known = settings()
    editable = set(bodies.edit.model_fields) & set(known)
    kinds = generator_kinds()
    controls = [
        _control(known[name], kinds, name in editable) for name in bodies.generate.model_fields if name in known
    ]
    menu = "".join(f'<option value="{escape(k)}">{escape(k)}</option>' for k in kinds)
    return _TEMPLATE.replace("<!-- generator options -->", menu).replace(
        "<!-- sampling controls -->", "\n".join(controls)
    )


def _kind_of(setting: Setting) -> str:
    """How the page reads a setting's text: int, float, bool or text (what its Settings field is annotated)."""
    value_type = setting.value_type
    if value_type is bool:
        return "bool"
    return {int: "int", float: "float"}.get(value_type, "text")


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _attributes(values: dict[str, Any]) -> str:
    return " ".join(f'{name}="{escape(str(value))}"' for name, value in values.items() if value is not None)


def _control(setting: Setting, kinds: tuple[str, ...], editable: bool) -> str:
    """A labelled input (a menu where the Settings list the choices, or for a bool) for one setting."""
    ident = setting.dest if setting.dest not in _FIXED_IDS else f"setting-{setting.dest}"
    label = setting.label[:1].upper() + setting.label[1:]
    readers = [k for k in setting.kinds if k in kinds]
    if len(readers) < len(kinds):
        label += f" ({', '.join(readers)})"
    kind = _kind_of(setting)
    attributes = {
        "id": ident,
        "name": ident,
        "title": setting.help,
        "data-setting": setting.name,
        "data-label": setting.label,
        "data-type": kind,
        "data-kinds": " ".join(setting.kinds),
        "data-params": " ".join(dict.fromkeys(n for n in (setting.name, setting.short, *setting.cli_aliases) if n)),
        "data-edit": "1" if editable else "0",
    }
    if setting.choices or kind == "bool":
        choices = setting.choices or (True, False)
        options = "".join(f'<option value="{escape(_shown(c))}">{escape(_shown(c))}</option>' for c in choices)
        control = f'<select {_attributes(attributes)}><option value="">{BLANK}</option>{options}</select>'
    else:
        if kind in ("int", "float"):
            number = {"step": "1" if kind == "int" else "any", "min": setting.minimum, "max": setting.maximum}
            attributes |= {"type": "number", **number}
        else:
            attributes["type"] = "text"
        control = f"<input {_attributes(attributes | {'placeholder': BLANK})}>"
    return f'          <div><label for="{ident}">{escape(label)}</label>\n            {control}</div>'
