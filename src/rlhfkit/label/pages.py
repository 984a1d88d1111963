"""HTML templates (jinja2 with autoescaping: everything a person typed is shown escaped), CSS and JavaScript.

No build step: the templates are strings here, the script is one plain file served from /static/app.js. The
Content-Security-Policy forbids inline scripts, so even text that escaped escaping could not run; the script
writes labellers' text into the page with `textContent`, never as HTML.
"""

from __future__ import annotations

import functools

from starlette.responses import HTMLResponse

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf" content="{{ csrf }}"><title>{% block title %}{% endblock %} · rlhfkit label</title>
<link rel="stylesheet" href="/static/app.css"><script src="/static/app.js" defer></script></head>
<body><header><a class="brand" href="/">rlhfkit label</a>
{% if user %}<nav><a href="/prompt">Write a prompt</a><a href="/demonstrate">Demonstrate</a><a href="/rank">Rank</a>
<a href="/chat">Chat A/B</a><a href="/rate">Thumbs</a><a href="/history">My history</a>
{% if user.is_admin %}<a href="/admin">Progress</a>{% endif %}
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" class="link">Sign out {{ user.name }}</button></form></nav>{% endif %}</header>
<main>{% if saved %}<p class="saved" role="status">Saved your {{ saved }}. Thank you!</p>{% endif %}
{% block main %}{% endblock %}</main></body></html>"""

CONTEXT = """{% macro conversation(messages) %}<section class="conversation">{% for m in messages %}
<div class="msg {{ m.role }}"><span class="role">{{ m.role }}</span><div class="text">{{ m.content }}</div></div>
{% endfor %}</section>{% endmacro %}"""

HIDDEN = """<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="submission_id" value="{{ submission_id }}">"""

TEMPLATES = {
    "base.html": BASE,
    "context.html": CONTEXT,
    "login.html": """{% extends "base.html" %}{% block title %}Sign in{% endblock %}{% block main %}
<h1>Sign in</h1>{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<form method="post" action="/login" class="card"><label for="token">Your token (from your admin)</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<button type="submit" class="primary">Sign in</button></form>{% endblock %}""",
    "error.html": """{% extends "base.html" %}{% block title %}Error{% endblock %}{% block main %}
<h1>Something is wrong</h1><p class="error" role="alert">{{ message }}</p><p><a href="/">Back</a></p>{% endblock %}""",
    "home.html": """{% extends "base.html" %}{% block title %}Home{% endblock %}{% block main %}
<h1>Hello, {{ user.name }}</h1><p>What would you like to do?</p><ul class="tasks">
<li><a href="/prompt">Write a prompt</a> <span>{{ counts.prompt }} written</span></li>
<li><a href="/demonstrate">Write a demonstration</a> <span>{{ counts.demonstration }} written</span></li>
<li><a href="/rank">Rank responses</a> <span>{{ counts.ranking }} ranked</span></li>
<li><a href="/chat">Chat and compare two answers</a> <span>{{ counts.comparison }} compared</span></li>
<li><a href="/rate">Thumbs up or down</a> <span>{{ counts.rating }} rated</span></li></ul>{% endblock %}""",
    "prompt.html": """{% extends "base.html" %}{% block title %}Write a prompt{% endblock %}{% block main %}
<h1>Write a prompt</h1><p class="hint">Something a person might ask an assistant: a question, a task, a request.</p>
<form method="post" action="/api/prompts" class="card">""" + HIDDEN + """
<label for="text">Prompt</label><textarea id="text" name="text" rows="6" required></textarea>
<button type="submit" class="primary">Save prompt</button></form>{% endblock %}""",
    "demonstrate.html": """{% extends "base.html" %}{% import "context.html" as c %}
{% block title %}Write a demonstration{% endblock %}{% block main %}<h1>Write a demonstration</h1>
{% if not item %}<p class="empty">No prompts are waiting for you. <a href="/prompt">Write one</a>.</p>{% else %}
<p class="hint">Write the reply you would want the assistant to give.</p>{{ c.conversation([{"role": "user",
"content": item.prompt}]) }}<form method="post" action="/api/demonstrations" class="card">""" + HIDDEN + """
<input type="hidden" name="prompt_id" value="{{ item.prompt_id }}">
<label for="text">Your reply</label><textarea id="text" name="text" rows="8" required></textarea>
<button type="submit" class="primary">Save demonstration</button></form>{% endif %}{% endblock %}""",
    "rank.html": """{% extends "base.html" %}{% import "context.html" as c %}
{% block title %}Rank responses{% endblock %}{% block main %}<h1>Rank the responses</h1>
{% if not item %}<p class="empty">Nothing to rank{% if not can_generate %} (no model is served){% endif %}.
<a href="/prompt">Write a prompt</a> and come back.</p>{% else %}{{ c.conversation(item.context) }}
<p class="hint">Best at the top. Drag a response, use its ▲ ▼ buttons, or focus it and press ↑ / ↓.
Tick "tie" when a response is as good as the one above it.</p>
<form method="post" action="/api/rankings" id="rank-form">""" + HIDDEN + """
<input type="hidden" name="item_id" value="{{ item.item_id }}">
<input type="hidden" name="ranking" id="ranking" value="{{ range(item.responses | length) | list | tojson }}">
<input type="hidden" name="flags" id="flags" value="[]">
<ol id="rank-list">{% for r in item.responses %}
<li class="response" draggable="true" tabindex="0" data-index="{{ loop.index0 }}">
<div class="controls"><button type="button" class="up" aria-label="move up">▲</button>
<button type="button" class="down" aria-label="move down">▼</button>
<label class="tie-label"><input type="checkbox" class="tie"> tie with the one above</label></div>
<div class="text">{{ r.text }}</div></li>{% endfor %}</ol>
<fieldset><legend>Flag a problem (optional)</legend>{% for f in flags %}
<label><input type="checkbox" class="flag" value="{{ f }}"> {{ f }}</label>{% endfor %}</fieldset>
<button type="submit" class="primary">Submit ranking</button></form>{% endif %}{% endblock %}""",
    "chat.html": """{% extends "base.html" %}{% block title %}Chat A/B{% endblock %}{% block main %}
<h1>Chat and compare</h1><p class="hint">Each turn shows two answers. Pick the better one and say by how much;
the chat goes on with the one you picked.</p>
<section class="conversation" id="conversation" aria-live="polite"></section>
<section id="candidates" hidden><div class="pair">
<article class="cand" id="cand-a"><h2>A</h2><div class="text"></div></article>
<article class="cand" id="cand-b"><h2>B</h2><div class="text"></div></article></div>
<div class="choice"><label>How much better? <select id="strength">{% for s in strengths %}
<option value="{{ s }}"{% if s == "better" %} selected{% endif %}>{{ s }}</option>{% endfor %}</select></label>
<button type="button" id="pick-a" class="primary">A is better</button>
<button type="button" id="pick-tie">About the same</button>
<button type="button" id="pick-b" class="primary">B is better</button></div></section>
<form id="chat-form" class="card"><label for="message">Your message</label>
<textarea id="message" rows="3" required></textarea>
<button type="submit" id="send" class="primary">Send</button>
<button type="button" id="new-chat">New chat</button></form>
<p id="chat-status" role="status"></p>{% endblock %}""",
    "rate.html": """{% extends "base.html" %}{% import "context.html" as c %}
{% block title %}Thumbs up or down{% endblock %}{% block main %}<h1>Is this a good answer?</h1>
{% if not item %}<p class="empty">Nothing to rate{% if not can_generate %} (no model is served){% endif %}.
<a href="/prompt">Write a prompt</a> and come back.</p>{% else %}{{ c.conversation(item.context) }}
<div class="msg assistant shown"><span class="role">assistant</span><div class="text">{{ item.response.text }}</div></div>
<form method="post" action="/api/ratings" class="card">""" + HIDDEN + """
<input type="hidden" name="response_id" value="{{ item.response_id }}">
<label for="comment">Comment (optional)</label><textarea id="comment" name="comment" rows="2"></textarea>
<div class="thumbs"><button type="submit" name="thumbs" value="up" class="primary">👍 Good</button>
<button type="submit" name="thumbs" value="down">👎 Bad</button></div></form>{% endif %}{% endblock %}""",
    "history.html": """{% extends "base.html" %}{% block title %}My history{% endblock %}{% block main %}
<h1>My history</h1>{% for kind, rows in records.items() %}<h2>{{ kind }}s ({{ rows | length }})</h2>
{% if rows %}<table><thead><tr><th>id</th><th>time</th><th>what</th><th>corrects</th></tr></thead><tbody>
{% for r in rows %}<tr><td>{{ r.id }}</td><td>{{ r.created[:19] }}</td><td class="text">
{%- if r.text is defined %}{{ r.text }}{% elif r.ranking is defined %}ranking {{ r.ranking | tojson }} of item
{{ r.item_id }}{% if r.flags %}; flags: {{ r.flags | join(", ") }}{% endif %}{% elif r.choice is defined %}
{{ r.choice }} {{ r.strength or "" }} (responses {{ r.response_a }} / {{ r.response_b }}){% else %}
{{ "👍" if r.thumbs > 0 else "👎" }} response {{ r.response_id }} {{ r.comment }}{% endif %}</td>
<td>{{ r.supersedes or "" }}</td></tr>{% endfor %}</tbody></table>{% endif %}{% endfor %}{% endblock %}""",
    "admin.html": """{% extends "base.html" %}{% block title %}Progress{% endblock %}{% block main %}
<h1>Progress</h1><table><thead><tr><th>kind</th><th>labeller</th><th>records</th></tr></thead><tbody>
{% for kind, per in stats.records.items() %}{% for name, n in per.items() %}
<tr><td>{{ kind }}</td><td>{{ name }}</td><td>{{ n }}</td></tr>{% endfor %}{% endfor %}</tbody></table>
<h2>Agreement between labellers</h2><ul>
<li>Rankings: {% if stats.ranking_agreement.agreement is none %}no item ranked by two people yet{% else %}
{{ "%.0f" | format(100 * stats.ranking_agreement.agreement) }}% of {{ stats.ranking_agreement.pairs }} pairs
{% endif %}</li><li>A/B comparisons: {% if stats.comparison_agreement.agreement is none %}none compared twice yet
{% else %}{{ "%.0f" | format(100 * stats.comparison_agreement.agreement) }}% of
{{ stats.comparison_agreement.pairs }}{% endif %}</li></ul>
<h2>Ranking queue</h2>{% if not stats.ranking_queue %}<p>Empty.</p>{% else %}<table><thead><tr><th>round</th>
<th>models</th><th>revisions</th><th>items</th><th>items ranked</th><th>rankings in / wanted</th></tr></thead><tbody>
{% for g in stats.ranking_queue %}<tr><td>{{ g.batch or "made by the app" }}</td><td>{{ g.model }}</td>
<td>{{ g.revision }}</td><td>{{ g["items"] }}</td><td>{{ g.ranked }}</td>
<td>{{ g.rankings }}{% if g.wanted is not none %} / {{ g.wanted }}{% endif %}</td></tr>{% endfor %}</tbody></table>
{% endif %}{% endblock %}""",
}


@functools.cache
def environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True)


def render(name: str, status: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(environment().get_template(name).render(**context), status)


APP_CSS = """
*{box-sizing:border-box}body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.6rem 1rem;background:#1d2330;color:#fff}
header a,header .link{color:#fff;text-decoration:none}.brand{font-weight:700;margin-right:1rem}
nav{display:flex;flex-wrap:wrap;gap:.3rem 1rem;align-items:center}.inline{display:inline;margin:0}
.link{background:none;border:0;padding:0;font:inherit;cursor:pointer;text-decoration:underline}
main{max-width:60rem;margin:0 auto;padding:1rem}h1{font-size:1.5rem}
.card{display:flex;flex-direction:column;gap:.5rem;background:#fff;padding:1rem;border-radius:.5rem;
box-shadow:0 1px 3px #0002;margin:1rem 0}
textarea,input[type=password],select{font:inherit;padding:.4rem;border:1px solid #aab;border-radius:.3rem;width:100%}
select{width:auto}button{font:inherit;padding:.4rem .9rem;border-radius:.3rem;border:1px solid #889;background:#fff;
cursor:pointer}button.primary{background:#2b59c3;border-color:#2b59c3;color:#fff}
.saved{background:#e3f6e8;border:1px solid #7c7;padding:.5rem;border-radius:.3rem}
.error{background:#fde8e8;border:1px solid #d77;padding:.5rem;border-radius:.3rem}.hint,.empty{color:#556}
.text{white-space:pre-wrap;overflow-wrap:anywhere}.conversation{display:flex;flex-direction:column;gap:.5rem}
.msg{background:#fff;border-radius:.5rem;padding:.5rem .8rem;box-shadow:0 1px 2px #0002}
.msg.user{background:#e8eefc;align-self:flex-end;max-width:85%}.msg.assistant{max-width:85%}
.role{font-size:.75rem;text-transform:uppercase;color:#667;display:block}
#rank-list{padding-left:1.5rem}.response{background:#fff;border-radius:.5rem;padding:.6rem;margin:.5rem 0;
box-shadow:0 1px 3px #0002;cursor:grab}.response:focus{outline:3px solid #2b59c3}.response.dragging{opacity:.5}
.response.tied{border-left:4px solid #e0a100}.controls{display:flex;gap:.4rem;align-items:center;font-size:.85rem}
.controls button{padding:.1rem .5rem}fieldset{border:1px solid #ccd;border-radius:.3rem;margin:1rem 0}
fieldset label{display:inline-block;margin-right:1rem}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1rem;margin-top:1rem}.cand{background:#fff;padding:.6rem;
border-radius:.5rem;box-shadow:0 1px 3px #0002}.cand h2{font-size:1rem;margin:0}
.choice{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin:1rem 0}.thumbs{display:flex;gap:.5rem}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border-bottom:1px solid #dde;padding:.3rem;
text-align:left;vertical-align:top}ul.tasks li{margin:.4rem 0}ul.tasks span{color:#667;font-size:.9rem}
@media (max-width:600px){.pair{grid-template-columns:1fr}main{padding:.5rem}}
"""

APP_JS = r"""
"use strict";
const csrf = () => document.querySelector('meta[name="csrf"]').content;
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); b[6] = (b[6] & 15) | 64; b[8] = (b[8] & 63) | 128;
  const h = [...b].map(x => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
async function postJSON(url, body) {
  const r = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()}, body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

// Ranking: drag and drop, ▲ ▼ buttons, arrow keys on a focused response; ties with the response above.
function setupRanking(form) {
  const list = form.querySelector("#rank-list");
  const items = () => [...list.querySelectorAll("li.response")];
  const move = (li, dir) => {
    const sib = dir < 0 ? li.previousElementSibling : li.nextElementSibling;
    if (!sib) return;
    dir < 0 ? list.insertBefore(li, sib) : list.insertBefore(sib, li);
    li.focus(); refresh();
  };
  const refresh = () => items().forEach((li, i) => {
    const tie = li.querySelector(".tie"); tie.disabled = i === 0; if (i === 0) tie.checked = false;
    li.classList.toggle("tied", tie.checked);
  });
  let dragged = null;
  for (const li of items()) {
    li.querySelector(".up").addEventListener("click", () => move(li, -1));
    li.querySelector(".down").addEventListener("click", () => move(li, 1));
    li.querySelector(".tie").addEventListener("change", refresh);
    li.addEventListener("keydown", e => {
      if (e.target !== li) return;
      if (e.key === "ArrowUp") { e.preventDefault(); move(li, -1); }
      if (e.key === "ArrowDown") { e.preventDefault(); move(li, 1); }
    });
    li.addEventListener("dragstart", () => { dragged = li; li.classList.add("dragging"); });
    li.addEventListener("dragend", () => { li.classList.remove("dragging"); dragged = null; refresh(); });
    li.addEventListener("dragover", e => {
      e.preventDefault();
      if (!dragged || dragged === li) return;
      const box = li.getBoundingClientRect();
      list.insertBefore(dragged, e.clientY < box.top + box.height / 2 ? li : li.nextElementSibling);
    });
  }
  refresh();
  form.addEventListener("submit", () => {
    const ranking = [];
    for (const li of items()) {
      const i = Number(li.dataset.index);
      if (li.querySelector(".tie").checked && ranking.length) {
        const last = ranking.pop(); ranking.push(Array.isArray(last) ? [...last, i] : [last, i]);
      } else ranking.push(i);
    }
    form.querySelector("#ranking").value = JSON.stringify(ranking);
    form.querySelector("#flags").value = JSON.stringify(
      [...form.querySelectorAll(".flag:checked")].map(c => c.value));
  });
}

// Chat A/B: every assistant turn offers two candidates; the chosen one continues the chat.
function setupChat() {
  const conv = document.getElementById("conversation"), cands = document.getElementById("candidates");
  const form = document.getElementById("chat-form"), box = document.getElementById("message");
  const status = document.getElementById("chat-status"), send = document.getElementById("send");
  let messages = [], promptId = null, shown = null;
  const show = (role, text) => {
    const div = document.createElement("div"); div.className = `msg ${role}`;
    const r = document.createElement("span"); r.className = "role"; r.textContent = role;
    const t = document.createElement("div"); t.className = "text"; t.textContent = text;
    div.append(r, t); conv.append(div);
  };
  form.addEventListener("submit", async e => {
    e.preventDefault();
    const text = box.value; if (!text.trim() || shown) return;
    messages.push({role: "user", content: text}); show("user", text); box.value = "";
    send.disabled = true; status.textContent = "The models are writing…";
    try {
      const data = await postJSON("/api/chat/turn", {messages, prompt_id: promptId});
      promptId = data.prompt_id; shown = data.candidates;
      document.querySelector("#cand-a .text").textContent = shown[0].text;
      document.querySelector("#cand-b .text").textContent = shown[1].text;
      cands.hidden = false; status.textContent = "Which answer is better?";
    } catch (err) { messages.pop(); conv.lastChild.remove(); box.value = text; status.textContent = err.message; }
    send.disabled = false;
  });
  const pick = async choice => {
    if (!shown) return;
    const body = {submission_id: newId(), response_a: shown[0].id, response_b: shown[1].id, choice,
                  strength: document.getElementById("strength").value};
    try {
      await postJSON("/api/comparisons", body);
      const kept = shown[choice === "b" ? 1 : 0].text;
      messages.push({role: "assistant", content: kept}); show("assistant", kept);
      shown = null; cands.hidden = true; status.textContent = "Saved. Write your next message."; box.focus();
    } catch (err) { status.textContent = err.message; }
  };
  document.getElementById("pick-a").addEventListener("click", () => pick("a"));
  document.getElementById("pick-b").addEventListener("click", () => pick("b"));
  document.getElementById("pick-tie").addEventListener("click", () => pick("tie"));
  document.getElementById("new-chat").addEventListener("click", () => {
    messages = []; promptId = null; shown = null; conv.replaceChildren(); cands.hidden = true; status.textContent = "";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const rank = document.getElementById("rank-form"); if (rank) setupRanking(rank);
  if (document.getElementById("chat-form")) setupChat();
});
"""

STATIC = {"app.css": (APP_CSS, "text/css"), "app.js": (APP_JS, "text/javascript")}
