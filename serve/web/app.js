// The Galen page: pick a task, give an image and/or text, see the answer and the model version that gave it.
// Image tasks are sent as multipart uploads, text tasks as JSON, to the same /v1/<task> routes programs use.
"use strict";

const IMAGE_TASKS = new Set(["vqa", "caption", "classify", "ground"]);
const $ = (id) => document.getElementById(id);

function showFields() {
  const task = $("task").value;
  for (const el of document.querySelectorAll(".field")) {
    el.hidden = !el.dataset.tasks.split(" ").includes(task);
  }
}

function list(value) {
  return value.split(",").map((x) => x.trim()).filter((x) => x);
}

function request(task) {
  const fields = {
    vqa: { question: $("question").value, candidates: list($("candidates").value) },
    caption: {},
    classify: { labels: list($("labels").value) },
    ground: { text: $("text").value },
    nli: { premise: $("premise").value, hypothesis: $("hypothesis").value },
    summarize: { text: $("text").value },
  }[task];
  if (!IMAGE_TASKS.has(task)) {
    return { body: JSON.stringify(fields), headers: { "Content-Type": "application/json" } };
  }
  const file = $("image").files[0];
  if (!file) throw new Error("choose an image first");
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [key, value] of Object.entries(fields)) {
    if (Array.isArray(value)) value.forEach((v) => form.append(key, v));
    else form.append(key, value);
  }
  return { body: form, headers: {} };
}

function drawBox(box) {
  const img = $("preview"), canvas = $("overlay");
  canvas.width = img.clientWidth;
  canvas.height = img.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!box || !img.naturalWidth) return;
  const sx = canvas.width / img.naturalWidth, sy = canvas.height / img.naturalHeight;
  ctx.strokeStyle = "#e4572e";
  ctx.lineWidth = 2;
  ctx.strokeRect(box[0] * sx, box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy);
}

function showAnswer(task, data) {
  $("error").hidden = true;
  $("result").hidden = false;
  $("answer").textContent = data.answer;
  $("box").textContent = data.box ? "Box (pixels): [" + data.box.map((v) => v.toFixed(1)).join(", ") + "]" : "";
  const table = $("scores");
  table.replaceChildren();
  for (const [label, p] of Object.entries(data.scores || {}).sort((a, b) => b[1] - a[1])) {
    const row = table.insertRow();
    row.insertCell().textContent = label;
    row.insertCell().textContent = (100 * p).toFixed(1) + "%";
  }
  const m = data.model;
  $("answered-by").textContent = `Answered by ${m.name} version ${m.version} (alias ${m.alias})`;
  drawBox(task === "ground" ? data.box : null);
}

function showError(message) {
  $("result").hidden = true;
  $("error").hidden = false;
  $("error").textContent = message;
}

async function ask(event) {
  event.preventDefault();
  const task = $("task").value;
  $("ask").disabled = true;
  try {
    const { body, headers } = request(task);
    const response = await fetch(`/v1/${task}`, { method: "POST", body, headers });
    const data = await response.json();
    if (!response.ok) {
      const err = data.error || {};
      showError(`Error ${response.status} (${err.type || "error"}): ${err.message || response.statusText}`);
    } else {
      showAnswer(task, data);
    }
  } catch (e) {
    showError(e.message);
  } finally {
    $("ask").disabled = false;
  }
}

async function loadModel() {
  try {
    const data = await (await fetch("/v1/models")).json();
    const m = data.data[0];
    $("model-badge").textContent = m ? `${m.id} version ${m.version} (alias ${m.alias})` : "no model loaded";
  } catch (e) {
    $("model-badge").textContent = "unavailable";
  }
}

$("task").addEventListener("change", showFields);
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  drawBox(null);
  if (file && file.type.startsWith("image/")) $("preview").src = URL.createObjectURL(file);
  else $("preview").removeAttribute("src");
});
$("ask-form").addEventListener("submit", ask);
showFields();
loadModel();
