// The console page: plain JS over the JSON API of web_app.py (the same API a script would use).
'use strict';

const $ = (id) => document.getElementById(id);
const state = {
  token: null,
  card: null,          // GET /api/model
  scores: [],          // scores of the labelled (or held-out) images, for the threshold control
  labels: null,        // 1 = anomalous, 0 = normal, aligned with scores
  threshold: null,     // the value under the control (saved or not)
  results: [],         // rows of the results table: {name, score, anomaly, figure?, path?, error?}
  sortDescending: true,
  selected: null,
  folder: '',
};

// -- API -----------------------------------------------------------------------------------------

function readToken() {
  // ?token= on the first load; kept for this tab only and taken out of the address bar.
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get('token');
  if (fromUrl !== null) {
    sessionStorage.setItem('console_token', fromUrl);
    url.searchParams.delete('token');
    window.history.replaceState(null, '', url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem('console_token');
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = 'Bearer ' + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = response.status + ' ' + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

function postJson(path, body) {
  return api(path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
}

function setStatus(text) { $('status').textContent = text; }

const fmt = (x) => (x === null || x === undefined ? '–' : Number(x).toFixed(3));
const pct = (x) => (x === null ? 'n/a' : (100 * x).toFixed(1) + ' %');

// -- model card ----------------------------------------------------------------------------------

function showCard(card) {
  state.card = card;
  $('card-model').textContent = card.model;
  $('card-method').textContent = card.method + (card.localizes ? '' : ' (no heat maps)');
  $('card-train').textContent = card.n_train_images + (card.train_dir ? ' from ' + card.train_dir : '');
  $('card-threshold').textContent = fmt(card.threshold);
  $('card-source').textContent = card.threshold_source;
  $('card-pixel').textContent = fmt(card.pixel_threshold);
  $('card-feat').textContent = card.feature_file;
  $('folder-panel').hidden = !card.data_root;
  for (const row of state.results) {
    if (row.score !== undefined) row.anomaly = row.score >= card.threshold;
  }
  renderResults();
}

// -- threshold control ---------------------------------------------------------------------------

async function loadScores() {
  for (;;) {
    const s = await getJson('/api/scores');
    if (s.state === 'scoring') {
      $('scores-source').textContent = `Scoring ${s.source}: ${s.done} / ${s.total}…`;
      await new Promise((resolve) => setTimeout(resolve, 500));
      continue;
    }
    state.scores = s.scores;
    state.labels = s.labels;
    $('scores-source').textContent = s.state === 'ready'
      ? `Scores of ${s.scores.length} ${s.source}` : 'No labelled or held-out scores in this feature file.';
    setupSlider();
    return;
  }
}

function setupSlider() {
  const values = state.scores.concat([state.card.threshold]);
  const lo = Math.min(...values), hi = Math.max(...values);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.1 || 1;
  const slider = $('threshold-slider');
  slider.min = Math.max(0, lo - pad);
  slider.max = hi + pad;
  slider.step = (slider.max - slider.min) / 1000;
  setThreshold(state.card.threshold);
}

function setThreshold(t) {
  state.threshold = t;
  $('threshold-slider').value = t;
  if (document.activeElement !== $('threshold-value')) $('threshold-value').value = Number(t).toFixed(4);
  const normal = [], anomalous = [];
  state.scores.forEach((s, i) => ((state.labels && state.labels[i]) ? anomalous : normal).push(s));
  const fpr = normal.length ? normal.filter((s) => s >= t).length / normal.length : null;
  const recall = anomalous.length ? anomalous.filter((s) => s >= t).length / anomalous.length : null;
  $('fpr').textContent = pct(fpr);
  $('recall').textContent = recall === null ? 'n/a (no defect images)' : pct(recall);
  $('rate-counts').textContent = `(${normal.length} normal, ${anomalous.length} defective)`;
  $('save-threshold').disabled = state.card && t === state.card.threshold;
  drawHistogram(normal, anomalous, t);
}

function drawHistogram(normal, anomalous, t) {
  const canvas = $('histogram'), ctx = canvas.getContext('2d');
  const slider = $('threshold-slider');
  const lo = Number(slider.min), hi = Number(slider.max);
  const W = canvas.width, H = canvas.height, bottom = H - 20, bins = 50;
  const x = (v) => ((v - lo) / (hi - lo)) * W;
  const count = (list) => {
    const c = new Array(bins).fill(0);
    for (const v of list) c[Math.min(bins - 1, Math.max(0, Math.floor(((v - lo) / (hi - lo)) * bins)))] += 1;
    return c;
  };
  const n = count(normal), a = count(anomalous);
  const top = Math.max(1, ...n.map((v, i) => v + a[i]));
  ctx.clearRect(0, 0, W, H);
  const bw = W / bins;
  for (let i = 0; i < bins; i++) {
    const hn = (n[i] / top) * (bottom - 10), ha = (a[i] / top) * (bottom - 10);
    ctx.fillStyle = '#4a7bd0';
    ctx.fillRect(i * bw + 1, bottom - hn, bw - 2, hn);
    ctx.fillStyle = '#d04a4a';
    ctx.fillRect(i * bw + 1, bottom - hn - ha, bw - 2, ha);
  }
  ctx.strokeStyle = '#999';
  ctx.beginPath(); ctx.moveTo(0, bottom + 0.5); ctx.lineTo(W, bottom + 0.5); ctx.stroke();
  ctx.fillStyle = '#555';
  ctx.font = '11px sans-serif';
  ctx.textAlign = 'left'; ctx.fillText(lo.toFixed(1), 2, H - 5);
  ctx.textAlign = 'right'; ctx.fillText(hi.toFixed(1), W - 2, H - 5);
  ctx.textAlign = 'left';
  [['#4a7bd0', 'normal'], ['#d04a4a', 'defective']].forEach(([color, label], i) => {
    ctx.fillStyle = color; ctx.fillRect(W - 150 + 75 * i, 4, 10, 10);
    ctx.fillStyle = '#333'; ctx.fillText(label, W - 136 + 75 * i, 13);
  });
  ctx.strokeStyle = '#111'; ctx.lineWidth = 2;
  ctx.beginPath(); ctx.moveTo(x(t), 0); ctx.lineTo(x(t), bottom); ctx.stroke();
  ctx.lineWidth = 1;
  ctx.fillStyle = '#111'; ctx.textAlign = x(t) > W / 2 ? 'right' : 'left';
  ctx.fillText(' threshold ' + Number(t).toFixed(2) + ' ', x(t), 30);
}

async function saveThreshold() {
  $('save-threshold').disabled = true;
  try {
    const card = await (await postJson('/api/threshold', { threshold: state.threshold })).json();
    showCard(card);
    setThreshold(card.threshold);
    setStatus(`Threshold ${fmt(card.threshold)} saved to ${card.feature_file}`);
  } catch (e) {
    setStatus('Saving failed: ' + e.message);
    $('save-threshold').disabled = false;
  }
}

// -- results table -------------------------------------------------------------------------------

function verdictCell(row) {
  const td = document.createElement('td');
  if (row.error) { td.textContent = row.error; td.className = 'verdict-error'; return td; }
  td.textContent = row.anomaly ? 'ANOMALY' : 'normal';
  td.className = row.anomaly ? 'verdict-anomaly' : 'verdict-normal';
  return td;
}

function renderResults() {
  const body = $('result-rows');
  const rows = state.results.slice().sort((p, q) => {
    const a = p.score === undefined ? -Infinity : p.score, b = q.score === undefined ? -Infinity : q.score;
    return state.sortDescending ? b - a : a - b;
  });
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement('tr');
    const name = document.createElement('td');
    name.textContent = row.name;
    const score = document.createElement('td');
    score.className = 'score';
    score.textContent = row.score === undefined ? '' : fmt(row.score);
    tr.append(name, score, verdictCell(row), reviewCell(row));
    if (row === state.selected) tr.className = 'selected';
    tr.addEventListener('click', () => select(row));
    return tr;
  }));
}

// -- review: correct verdicts, teach the detector ---------------------------------------------------

const LABELS = { normal: 'normal (false alarm)', defect: 'defect (missed)' };

function reviewCell(row) {
  const td = document.createElement('td');
  if (row.id === undefined) return td;
  for (const [label, text] of Object.entries(LABELS)) {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = text;
    button.className = 'review-' + label + (row.label === label ? ' active' : '');
    button.addEventListener('click', (e) => {
      e.stopPropagation();
      review(row, row.label === label ? null : label);
    });
    td.append(button);
  }
  return td;
}

async function review(row, label) {
  try {
    showReview(await (await postJson('/api/review', { id: row.id, label })).json());
    row.label = label;
    renderResults();
  } catch (e) { setStatus('Review: ' + e.message); }
}

function showReview(queue) {
  $('review-rows').replaceChildren(...queue.queue.map((item) => {
    const tr = document.createElement('tr');
    for (const text of [item.name, fmt(item.score), item.anomaly ? 'ANOMALY' : 'normal', item.label ? LABELS[item.label] : '–']) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    if (item.label) tr.className = 'labelled';
    return tr;
  }));
  $('history').replaceChildren(...queue.history.map((entry) => {
    const li = document.createElement('li');
    const what = entry.kind === 'undo' ? `undo of #${entry.undoes}` : `${entry.kind} ${entry.n_images} images`;
    const after = entry.thresholds_after ? fmt(entry.thresholds_after.image) : '–';
    li.textContent = `#${entry.id} ${entry.time} by ${entry.by}: ${what}, threshold ${after}`;
    return li;
  }));
  $('review-undo').disabled = !queue.undoable;
}

async function reviewAction(path, describe) {
  for (const id of ['review-preview-button', 'review-apply', 'review-undo']) $(id).disabled = true;
  setStatus('Working…');
  try {
    const answer = await (await postJson(path, {})).json();
    describe(answer);
  } catch (e) { setStatus(e.message); }
  for (const id of ['review-preview-button', 'review-apply']) $(id).disabled = false;
  showReview(await getJson('/api/review'));
}

function previewReview() {
  return reviewAction('/api/review/preview', (p) => {
    const recall = p.recall === null || p.recall === undefined ? 'n/a (no labelled defects)'
      : `${pct(p.recall)} of ${p.n_defects} labelled defects`;
    $('review-preview').textContent = `Teaching ${p.n_normal} normal + ${p.n_defect} defect images: threshold `
      + `${fmt(p.threshold_before)} → ${fmt(p.threshold_after)} (${p.source_after}); FPR ${pct(p.holdout_fpr)} `
      + `of ${p.n_holdout} held-out good images; recall ${recall}`;
    setStatus('Preview ready: nothing applied yet');
  });
}

function afterChange(answer, what) {
  showCard(answer.model);
  setThreshold(answer.model.threshold);
  state.results = state.results.filter((row) => !row.label);
  renderResults();
  $('review-preview').textContent = '';
  setStatus(`${what}: threshold ${fmt(answer.model.threshold)} (${answer.model.threshold_source})`);
  loadScores();
}

async function select(row) {
  state.selected = row;
  renderResults();
  if (row.error) return;
  if (!row.figure && row.path !== undefined) {
    setStatus('Drawing ' + row.name + '…');
    try {
      row.figure = (await getJson('/api/inspect?path=' + encodeURIComponent(row.path))).figure;
      setStatus('');
    } catch (e) { setStatus(row.name + ': ' + e.message); return; }
  }
  if (state.selected === row) {
    $('figure').src = row.figure;
    $('figure').hidden = false;
    $('figure-note').textContent = row.name;
  }
}

// -- inspecting ------------------------------------------------------------------------------------

function progress(done, total) {
  const bar = $('progress');
  bar.hidden = done >= total;
  bar.max = Math.max(total, 1);
  bar.value = done;
}

async function scoreFiles(files) {
  let done = 0, last = null;
  for (const file of files) {
    setStatus(`Scoring ${file.name} (${done + 1} / ${files.length})…`);
    progress(done, files.length);
    const form = new FormData();
    form.append('file', file, file.name);
    let row;
    try {
      const r = await (await api('/api/score', { method: 'POST', body: form })).json();
      row = { name: file.name, score: r.score, anomaly: r.anomaly, figure: r.figure, id: r.id };
    } catch (e) {
      row = { name: file.name, error: e.message };
    }
    state.results.push(row);
    last = row;
    done += 1;
    renderResults();
  }
  progress(done, files.length);
  setStatus(`Scored ${done} image${done === 1 ? '' : 's'}`);
  if (last) select(last);
}

async function listFolder(dir) {
  try {
    const listing = await getJson('/api/images?dir=' + encodeURIComponent(dir));
    state.folder = listing.dir === '.' ? '' : listing.dir;
    const select = $('folder-select');
    const options = [[state.folder, (state.folder || '(data root)') + '/']];
    if (state.folder) options.push([state.folder.split('/').slice(0, -1).join('/'), '.. (up)']);
    for (const d of listing.dirs) options.push([(state.folder ? state.folder + '/' : '') + d, '  ' + d + '/']);
    select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
    $('folder-count').textContent = `${listing.count} image${listing.count === 1 ? '' : 's'}`;
  } catch (e) { setStatus('Folder: ' + e.message); }
}

async function scoreFolder() {
  const button = $('score-folder');
  button.disabled = true;
  try {
    const response = await postJson('/api/folder', { dir: state.folder });
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = '', total = 0, done = 0;
    for (;;) {
      const { value, done: finished } = await reader.read();
      if (finished) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split('\n');
      buffer = lines.pop();
      for (const line of lines.filter(Boolean)) {
        const msg = JSON.parse(line);
        if (msg.total !== undefined) { total = msg.total; }
        else if (msg.done) { setStatus(`Scored ${msg.scored} images of ${state.folder || 'the data root'}: ${msg.anomalous} anomalous`); }
        else {
          done += 1;
          state.results.push(msg.error ? { name: msg.path, path: msg.path, error: msg.error }
            : { name: msg.path, path: msg.path, score: msg.score, anomaly: msg.anomaly, id: msg.id });
          if (done % 16 === 0 || done === total) renderResults();
          setStatus(`Scoring ${state.folder || 'the data root'}: ${done} / ${total}`);
        }
        progress(done, total);
      }
    }
    renderResults();
  } catch (e) {
    setStatus('Folder scoring failed: ' + e.message);
  } finally {
    button.disabled = false;
    $('progress').hidden = true;
  }
}

// -- wiring ----------------------------------------------------------------------------------------

function wire() {
  const drop = $('drop');
  $('file-input').addEventListener('change', (e) => scoreFiles(Array.from(e.target.files)));
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    scoreFiles(Array.from(e.dataTransfer.files));
  });
  $('threshold-slider').addEventListener('input', (e) => setThreshold(Number(e.target.value)));
  $('threshold-value').addEventListener('change', (e) => {
    const t = Number(e.target.value);
    if (Number.isFinite(t)) setThreshold(t);
  });
  $('save-threshold').addEventListener('click', saveThreshold);
  $('sort-score').addEventListener('click', () => { state.sortDescending = !state.sortDescending; renderResults(); });
  $('folder-select').addEventListener('change', (e) => listFolder(e.target.value));
  $('score-folder').addEventListener('click', scoreFolder);
  $('review-preview-button').addEventListener('click', previewReview);
  $('review-apply').addEventListener('click', () => reviewAction('/api/review/apply', (a) => afterChange(a, 'Applied')));
  $('review-undo').addEventListener('click', () => reviewAction('/api/review/undo', (a) => afterChange(a, 'Undone')));
}

async function start() {
  state.token = readToken();
  wire();
  try {
    showCard(await getJson('/api/model'));
    if (state.card.data_root) listFolder('');
    await loadScores();
    showReview(await getJson('/api/review'));
    document.body.dataset.ready = 'true';
  } catch (e) {
    setStatus(e.message);
  }
}

start();
