// The chat page: a conversation streamed from this server's /v1/chat/completions.
// Plain JavaScript, nothing fetched but this server's own API.
"use strict";

const $ = (id) => document.getElementById(id);
let messages = [];         // the conversation so far, as the API takes it
let controller = null;     // aborts the answer being streamed (the Stop button)
let modelName = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return response.status + " " + response.statusText; }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { $("model").textContent = "(" + await errorText(response) + ")"; return; }
  modelName = (await response.json()).data[0].id;
  $("model").textContent = modelName;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Server-sent events: "data: {json}" blocks separated by a blank line, ending "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!modelName) await loadModel();
  if (!modelName) { bubble("error", "the server did not name its model: " + $("model").textContent); return; }
  const conversation = messages;  // "New chat" starts another array: a late answer stays in its own
  conversation.push({ role: "user", content: text });
  bubble("user", text);
  const answer = bubble("assistant streaming", "");
  const system = $("system").value.trim();
  const body = {
    model: modelName, stream: true, stream_options: { include_usage: true },
    messages: system ? [{ role: "system", content: system }, ...conversation] : conversation,
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  controller = new AbortController();
  busy(true);
  $("status").textContent = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions",
      { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) $("status").textContent =
        `${chunk.usage.prompt_tokens} prompt tokens, ${chunk.usage.completion_tokens} generated`;
      for (const choice of chunk.choices) {
        if (choice.delta.content) { answer.textContent += choice.delta.content; answer.scrollIntoView({ block: "end" }); }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    if (finish === "length") $("status").textContent += " (stopped at max tokens)";
  } catch (e) {
    if (e.name === "AbortError") $("status").textContent = "stopped";
    else bubble("error", e.message);
  } finally {
    answer.classList.remove("streaming");
    conversation.push({ role: "assistant", content: answer.textContent });
    controller = null;
    busy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  $("conversation").replaceChildren();
  $("status").textContent = "";
  $("input").focus();
});
$("api-key").addEventListener("change", loadModel);
loadModel();
