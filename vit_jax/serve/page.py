"""The recognizer's web page: self-contained HTML, CSS and JS (no external assets: works offline).

It reads /api/info (model name, classes), lets the user pick or drop a photo, shows it, posts it
to /api/predict and draws the top-k classes as probability bars, then (JAX backend) shows the
attention map from /api/attention. Element ids used by the tests: `file`, `drop`, `photo`,
`status`, `results` (rows with `.label` and `.prob`), `model`, `classes`, `attention`,
`examples` (one `img.example` per sample photo; a click classifies it).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ViT recognizer</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 1.5rem; text-align: center; }
.example { height: 4rem; margin: 0 .3rem .5rem 0; cursor: pointer; border: 1px solid #ccc;
           image-rendering: pixelated; }
#drop.over { background: #eef4ff; border-color: #36c; }
#photo, #attention { max-width: 45%; max-height: 18rem; display: none; margin: 1rem .5rem;
                     vertical-align: top; image-rendering: pixelated; }
.row { display: grid; grid-template-columns: 12rem 1fr 4.5rem; gap: .5rem; align-items: center;
       margin: .3rem 0; }
.bar { background: #eee; height: 1rem; border-radius: 4px; overflow: hidden; }
.bar div { background: #36c; height: 100%; }
.prob { text-align: right; font-variant-numeric: tabular-nums; }
#status.error { color: #b00; }
small { color: #666; }
</style></head>
<body>
<h1>ViT recognizer</h1>
<p>Model <b id="model">…</b> <small id="classes"></small></p>
<p><small id="runtime"></small></p>
<div id="examples"></div>
<div id="drop">Drop a photo here or <input type="file" id="file" accept="image/*"></div>
<div><img id="photo" alt="the uploaded photo"><img id="attention" alt="attention map"></div>
<p><small id="attention_kind"></small></p>
<p id="status"></p>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
let attentionKind = null;
fetch("/api/info").then((r) => r.json()).then((info) => {
  attentionKind = info.attention;
  $("model").textContent = info.model_name;
  $("runtime").textContent = "served by " + info.backend + ", " + info.precision;
  for (const name of info.examples) {
    const img = document.createElement("img");
    img.className = "example";
    img.src = "/examples/" + encodeURIComponent(name);
    img.alt = img.title = name;
    img.addEventListener("click", async () => {
      const blob = await (await fetch(img.src)).blob();
      classify(new File([blob], name, {type: blob.type}));
    });
    $("examples").appendChild(img);
  }
  $("classes").textContent = info.class_names.length + " classes: " +
      info.class_names.join(", ");
});
function show(predictions) {
  const box = $("results");
  box.textContent = "";
  for (const p of predictions) {
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = (100 * p.probability).toFixed(1) + "%";
    bar.appendChild(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = (100 * p.probability).toFixed(1) + "%";
    row.append(label, bar, prob);
    box.appendChild(row);
  }
}
async function classify(file) {
  $("photo").src = URL.createObjectURL(file);
  $("photo").style.display = "block";
  $("status").className = "";
  $("status").textContent = "Classifying " + file.name + "…";
  $("results").textContent = "";
  $("attention").style.display = "none";
  $("attention_kind").textContent = "";
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await fetch("/api/predict", {method: "POST", body: form});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    show(body.predictions[0]);
    $("status").textContent = file.name;
    if (attentionKind) {
      const map = await fetch("/api/attention", {method: "POST", body: form});
      if (map.ok) {
        $("attention").src = URL.createObjectURL(await map.blob());
        $("attention").style.display = "inline-block";
        $("attention_kind").textContent = "Red: " + attentionKind + ".";
      }
    }
  } catch (e) {
    $("status").className = "error";
    $("status").textContent = "Error: " + e.message;
  }
}
$("file").addEventListener("change", (e) => {
  if (e.target.files.length) classify(e.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""
