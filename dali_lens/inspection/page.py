"""``index.html``: one self-contained grading page (inline CSS and JS, thumbnails as data: URIs, no network).

Keys: arrow keys move (left/right one candidate, up/down one row), 0-3 grade (0 not a lens, 1 possible,
2 probable, 3 definite) and move on, ``s`` or space skips, Backspace/Delete clears a grade. Grades are kept in
the browser's localStorage (per page: the same candidates and imported grades share them) and survive reloads;
a browser that refuses localStorage still grades, and the count says the grades are not kept. "export
grades.csv" downloads ``id,grade,score``.
"""
from __future__ import annotations

import html
import json

_CSS = """
body{font:13px system-ui,sans-serif;margin:0;background:#16181d;color:#ddd}
header{position:sticky;top:0;background:#22252c;padding:8px 12px;z-index:2;border-bottom:1px solid #333}
header h1{font-size:15px;margin:0 0 6px 0}
header label{margin-right:12px}
header select,header button{font:inherit}
#help{color:#999;font-size:12px;margin-top:4px}
#grid{display:flex;flex-wrap:wrap;gap:8px;padding:10px}
.card{width:170px;background:#22252c;border:3px solid #22252c;border-radius:4px;padding:4px;cursor:pointer}
.card img{width:170px;height:170px;display:block;background:#000}
.card .cap{font:11px ui-monospace,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.card.false-positive{border-color:#dc2828}.card.missed{border-color:#1e96ff}
.card.cur{outline:3px solid #ffd400;outline-offset:1px}
.mark{font-weight:bold}.false-positive .mark{color:#ff6b6b}.missed .mark{color:#6bb8ff}
.grade{float:right;font-weight:bold;padding:0 4px;border-radius:3px}
.g0{background:#555}.g1{background:#7a6a1c}.g2{background:#2f7d32}.g3{background:#1b5e20;color:#fff}
.problem{color:#ff8a80}
"""

_JS = r"""
(function(){
const DATA = JSON.parse(document.getElementById('data').textContent);
const C = DATA.candidates, KEY = 'dali-lens-grades:' + DATA.key;
let grades, kept = true;  // kept: false once this browser refused to store the grades (shown next to the count)
try { grades = JSON.parse(localStorage.getItem(KEY)); } catch (e) { grades = null; kept = false; }
if (!grades || typeof grades !== 'object') grades = Object.assign({}, DATA.grades);
let view = [], cur = 0;
const grid = document.getElementById('grid'), sortSel = document.getElementById('sort'),
      filtSel = document.getElementById('filter'), count = document.getElementById('count');
function save() { try { localStorage.setItem(KEY, JSON.stringify(grades)); } catch (e) { kept = false; } }
function labelName(l) { return l === 1 ? 'lens' : l === 0 ? 'non-lens' : 'unlabelled'; }
function keep(c) {
  const f = filtSel.value, g = grades[c.key];
  if (f === 'all') return true;
  if (f === 'lens') return c.label === 1;
  if (f === 'nonlens') return c.label === 0;
  if (f === 'unlabelled') return c.label === null;
  if (f === 'false-positive' || f === 'missed') return c.kind === f;
  if (f === 'ungraded') return g === undefined;
  if (f === 'graded') return g !== undefined;
  return true;
}
function card(i) {
  const c = C[i], d = document.createElement('div');
  d.className = 'card' + (c.kind ? ' ' + c.kind : '');
  d.dataset.i = i; d.dataset.id = c.id;
  const img = document.createElement('img'); img.src = c.img; img.alt = c.id; d.appendChild(img);
  c.caption.forEach(function(t, j){
    const p = document.createElement('div'); p.className = 'cap' + (j === 2 && c.kind ? ' mark' : '') +
      (j === 2 && c.problem ? ' problem' : '');
    p.textContent = t; p.title = t; d.appendChild(p);
  });
  const g = document.createElement('span'); g.className = 'grade';
  d.querySelector('.cap').prepend(g);
  d.addEventListener('click', function(){ cur = view.indexOf(i); paint(); });
  return d;
}
const cards = C.map(function(_, i){ return card(i); });
function build() {
  const s = sortSel.value;
  view = C.map(function(_, i){ return i; }).filter(function(i){ return keep(C[i]); });
  if (s === 'desc') view.sort(function(a, b){ return C[b].score - C[a].score; });
  if (s === 'asc') view.sort(function(a, b){ return C[a].score - C[b].score; });
  grid.replaceChildren.apply(grid, view.map(function(i){ return cards[i]; }));
  cur = Math.max(0, Math.min(cur, view.length - 1));
  paint();
}
function paint() {
  let n = 0;
  cards.forEach(function(d, i){
    const g = grades[C[i].key], b = d.querySelector('.grade');
    b.textContent = g === undefined ? '' : String(g); b.className = 'grade' + (g === undefined ? '' : ' g' + g);
    if (g !== undefined) n++;
    d.classList.toggle('cur', view[cur] === i);
  });
  count.textContent = 'graded ' + n + ' / ' + C.length + ' (shown ' + view.length + ')' +
    (kept ? '' : ' - not kept: this browser refuses to store them, export grades.csv before closing');
  const d = cards[view[cur]];
  if (d) d.scrollIntoView({block: 'nearest'});
}
function perRow() {
  if (view.length < 2) return 1;
  const top = cards[view[0]].offsetTop; let k = 0;
  while (k < view.length && cards[view[k]].offsetTop === top) k++;
  return Math.max(1, k);
}
function move(k) { cur = Math.max(0, Math.min(view.length - 1, cur + k)); paint(); }
document.addEventListener('keydown', function(e){
  if (e.target && (e.target.tagName === 'SELECT' || e.target.tagName === 'INPUT')) e.target.blur();
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const i = view[cur];
  if (e.key === 'ArrowRight') move(1);
  else if (e.key === 'ArrowLeft') move(-1);
  else if (e.key === 'ArrowDown') move(perRow());
  else if (e.key === 'ArrowUp') move(-perRow());
  else if (/^[0-3]$/.test(e.key) && i !== undefined) { grades[C[i].key] = Number(e.key); save(); move(1); }
  else if ((e.key === 's' || e.key === ' ') && i !== undefined) move(1);
  else if ((e.key === 'Backspace' || e.key === 'Delete') && i !== undefined) { delete grades[C[i].key]; save(); paint(); }
  else return;
  e.preventDefault();
});
function csv() {
  const rows = ['id,grade,score'], q = function(s){ return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; };
  C.slice().sort(function(a, b){ return b.score - a.score; }).forEach(function(c){
    if (grades[c.key] !== undefined) rows.push(q(c.key) + ',' + grades[c.key] + ',' + c.score);
  });
  return rows.join('\n') + '\n';
}
document.getElementById('export').addEventListener('click', function(){
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([csv()], {type: 'text/csv'}));
  a.download = 'grades.csv'; document.body.appendChild(a); a.click();
  setTimeout(function(){ URL.revokeObjectURL(a.href); a.remove(); }, 1000);
});
sortSel.addEventListener('change', build); filtSel.addEventListener('change', build);
window.gradesCsv = csv;
build();
})();
"""


def page_html(title: str, data: dict) -> str:
    """The page for ``data`` (``candidates``, ``grades``, ``key``, ...), as one string."""
    # every <, > and & as a JSON escape: no text in the data (an id such as <!--<script> or </script>) can end
    # the <script> element or enter its escaped states, and JSON.parse reads the same strings back
    blob = (json.dumps(data, separators=(",", ":"))
            .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))
    counts = {}
    for c in data["candidates"]:
        if c["kind"]:
            counts[c["kind"]] = counts.get(c["kind"], 0) + 1
    t = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body>
<header><h1>{t}</h1>
<label>sort <select id="sort"><option value="desc">score, highest first</option>
<option value="asc">score, lowest first</option><option value="order">selection order</option></select></label>
<label>show <select id="filter"><option value="all">all</option><option value="lens">lenses</option>
<option value="nonlens">non-lenses</option><option value="unlabelled">unlabelled</option>
<option value="false-positive">false positives ({counts.get('false-positive', 0)})</option>
<option value="missed">missed lenses ({counts.get('missed', 0)})</option>
<option value="ungraded">ungraded</option><option value="graded">graded</option></select></label>
<button id="export">export grades.csv</button> <span id="count"></span>
<div id="help">keys: &larr; &rarr; &uarr; &darr; move &middot; 0 not a lens, 1 possible, 2 probable, 3 definite
(then next) &middot; s or space: skip &middot; Backspace: clear &middot; grades are kept in this browser.
Red frame: false positive; blue frame: missed lens.</div></header>
<div id="grid"></div>
<script id="data" type="application/json">{blob}</script>
<script>{_JS}</script>
</body></html>
"""
