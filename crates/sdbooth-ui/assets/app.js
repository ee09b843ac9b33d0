// sdbooth ui: plain JS, no build step. The server does every check and runs every command;
// this page only fills forms and draws what the run's files say.
'use strict';

const TOKEN = document.querySelector('meta[name="sdbooth-token"]').content;
const $ = (sel) => document.querySelector(sel);

// Flags that have their own field in Set up, outside the flag groups.
const OWN_FIELDS = ['pretrained_model_name_or_path', 'dataset_config', 'output_dir', 'output_name', 'sample_prompts'];
const OPEN_GROUPS = ['Training', 'Optimizer', 'Memory and precision', 'Sampling'];
const FORM_KEY = 'sdbooth-ui-form';

let schema = null;
let lastSetup = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// Every POST carries the token in a header (the server refuses state changes without it).
async function api(path, body) {
  const opts = { headers: { 'X-Sdbooth-Token': TOKEN } };
  if (body !== undefined) {
    opts.method = 'POST';
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let data;
  try { data = JSON.parse(text); } catch (_) { data = { error: text }; }
  if (!resp.ok) {
    const err = new Error(data.error || `${resp.status}`);
    err.data = data;
    throw err;
  }
  return data;
}

// ---------- tabs ----------

function route() {
  const hash = location.hash.slice(1) || 'setup';
  const [tab, id] = hash.split('/');
  for (const t of ['setup', 'check', 'runs']) {
    $(`#tab-${t}`).classList.toggle('hidden', t !== (tab === 'run' ? 'runs' : tab));
  }
  document.querySelectorAll('nav a').forEach((a) => a.classList.toggle('active', a.dataset.tab === (tab === 'run' ? 'runs' : tab)));
  if (tab === 'runs' || tab === 'run') {
    loadRuns();
    if (tab === 'run' && id) openRun(decodeURIComponent(id)); else closeRun();
  } else {
    closeRun();
  }
}

// ---------- set up ----------

function flagInput(f) {
  const id = `flag-${f.name}`;
  let input;
  if (f.kind === 'switch') {
    input = el('input', { type: 'checkbox', id, 'data-flag': f.name, 'data-default': 'false' });
    return el('label', { class: 'check', title: f.help }, input, `--${f.name}`);
  }
  if (f.choices.length > 0) {
    const opts = f.choices.map((c) => el('option', { value: c }, c));
    if (!f.choices.includes(f.default)) opts.unshift(el('option', { value: '' }, f.default ? f.default : '(not set)'));
    input = el('select', { id, 'data-flag': f.name, 'data-default': f.default }, opts);
    input.value = f.default;
  } else {
    input = el('input', { id, 'data-flag': f.name, 'data-default': f.default, placeholder: f.default || f.value_name, value: f.default });
  }
  return el('label', { title: f.help }, `--${f.name}`, input, el('span', { class: 'flag-help' }, f.help));
}

function renderFlags() {
  const groups = new Map();
  for (const f of schema.flags) {
    if (OWN_FIELDS.includes(f.name)) continue;
    if (!groups.has(f.group)) groups.set(f.group, []);
    groups.get(f.group).push(f);
  }
  const box = $('#flag-groups');
  box.replaceChildren();
  for (const [group, flags] of groups) {
    box.append(el('details', { class: 'group', open: OPEN_GROUPS.includes(group), 'data-group': group },
      el('summary', {}, `${group} (${flags.length})`),
      el('div', { class: 'grid' }, flags.map(flagInput))));
  }
  box.addEventListener('input', markChanged);
  box.addEventListener('change', markChanged);
}

function fieldValue(input) {
  return input.type === 'checkbox' ? String(input.checked) : input.value;
}

function markChanged() {
  document.querySelectorAll('[data-flag]').forEach((i) => {
    i.classList.toggle('changed', fieldValue(i) !== (i.dataset.default || '') && !(i.type === 'checkbox' && !i.checked));
  });
  saveForm();
}

function setFlag(name, value) {
  const input = document.getElementById(`flag-${name}`);
  if (!input) return false;
  if (input.type === 'checkbox') input.checked = value === true || value === 'true';
  else input.value = value;
  return true;
}

function applyPreset(p) {
  document.querySelectorAll('[data-flag]').forEach((i) => {
    if (i.type === 'checkbox') i.checked = false; else i.value = i.dataset.default || '';
  });
  for (const [k, v] of p.flags) setFlag(k, v);
  markChanged();
  $('#setup-status').textContent = `preset applied: ${p.name}`;
}

function datasetKind() {
  return document.querySelector('input[name="ds-kind"]:checked').value;
}

function showDatasetKind() {
  $('#ds-folders').classList.toggle('hidden', datasetKind() !== 'folders');
  $('#ds-toml').classList.toggle('hidden', datasetKind() !== 'toml');
}

// The request the server turns into a command line (only changed flags are sent).
function collectSetup() {
  const flags = {};
  document.querySelectorAll('[data-flag]').forEach((i) => {
    const v = fieldValue(i);
    if (i.type === 'checkbox') { if (i.checked) flags[i.dataset.flag] = true; return; }
    if (v.trim() !== '' && v !== (i.dataset.default || '')) flags[i.dataset.flag] = v.trim();
  });
  const own = { pretrained_model_name_or_path: $('#model').value, output_dir: $('#output_dir').value, output_name: $('#output_name').value };
  for (const [k, v] of Object.entries(own)) if (v.trim()) flags[k] = v.trim();
  const req = { flags, sample_prompts: $('#sample_prompts').value };
  if (datasetKind() === 'toml') {
    if ($('#dataset_config').value.trim()) flags.dataset_config = $('#dataset_config').value.trim();
  } else {
    req.dataset_folders = {
      instance_dir: $('#instance_dir').value,
      instance_repeats: Number($('#instance_repeats').value || 1),
      class_tokens: $('#class_tokens').value,
      reg_dir: $('#reg_dir').value,
      reg_repeats: Number($('#reg_repeats').value || 1),
      reg_class_tokens: $('#reg_class_tokens').value,
      resolution: Number($('#resolution').value || 512),
      batch_size: Number($('#batch_size').value || 1),
      enable_bucket: $('#enable_bucket').checked,
    };
  }
  return req;
}

const PLAIN_FIELDS = ['model', 'instance_dir', 'instance_repeats', 'class_tokens', 'reg_dir', 'reg_repeats', 'reg_class_tokens',
  'resolution', 'batch_size', 'enable_bucket', 'dataset_config', 'output_dir', 'output_name', 'sample_prompts'];

// The form survives a reload (localStorage of this browser).
function saveForm() {
  const data = { kind: datasetKind(), fields: {}, flags: {} };
  for (const id of PLAIN_FIELDS) { const i = $(`#${id}`); data.fields[id] = i.type === 'checkbox' ? i.checked : i.value; }
  document.querySelectorAll('[data-flag]').forEach((i) => { data.flags[i.dataset.flag] = fieldValue(i); });
  localStorage.setItem(FORM_KEY, JSON.stringify(data));
}

function restoreForm() {
  let data;
  try { data = JSON.parse(localStorage.getItem(FORM_KEY) || 'null'); } catch (_) { data = null; }
  if (!data) return;
  for (const [id, v] of Object.entries(data.fields || {})) {
    const i = $(`#${id}`);
    if (!i) continue;
    if (i.type === 'checkbox') i.checked = v; else i.value = v;
  }
  for (const [k, v] of Object.entries(data.flags || {})) setFlag(k, v);
  const radio = document.querySelector(`input[name="ds-kind"][value="${data.kind}"]`);
  if (radio) radio.checked = true;
  showDatasetKind();
  markChanged();
}

async function loadSetup() {
  schema = await api('/api/schema');
  $('#presets').replaceChildren(...schema.presets.map((p) =>
    el('button', { class: 'preset', onclick: () => applyPreset(p) }, el('b', {}, p.name), el('small', {}, p.description))));
  renderFlags();
  restoreForm();
  document.querySelectorAll('#tab-setup input, #tab-setup textarea').forEach((i) => i.addEventListener('change', saveForm));
  const models = await api('/api/models');
  $('#model-list').replaceChildren(...models.map((m) => el('option', { value: m.value }, m.kind)));
  const counts = {};
  models.forEach((m) => { counts[m.kind] = (counts[m.kind] || 0) + 1; });
  $('#model-found').textContent = 'found: ' + Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(', ');
}

// ---------- check ----------

function table(target, headers, rows) {
  const t = $(target);
  t.replaceChildren(el('tr', {}, headers.map((h) => el('th', {}, h))),
    ...rows.map((r) => el('tr', {}, r.map((c) => el('td', { class: typeof c === 'number' ? 'num' : null }, c)))));
}

function reso(r) { return Array.isArray(r) ? r.join(' × ') : (r && typeof r === 'object' ? `${r.width ?? r[0]} × ${r.height ?? r[1]}` : String(r)); }

function problemList(title, items, warn) {
  if (!items || items.length === 0) return null;
  return el('div', { class: `card problems${warn ? ' warnings' : ''}` }, el('h3', {}, title), el('ul', {}, items.map((m) => el('li', {}, m))));
}

function renderCheck(res) {
  const { prepared, report } = res;
  $('#check-empty').classList.add('hidden');
  $('#check-result').classList.remove('hidden');
  const banner = $('#check-banner');
  banner.className = `banner ${report.ok ? 'ok' : 'bad'}`;
  banner.textContent = report.ok ? 'Ready: the dry run passed and every flag is supported.' : 'Not ready: see the problems below.';
  const problems = [
    problemList('The flags do not parse', report.parse_error ? [report.parse_error] : []),
    problemList('Refused by sdbooth train', report.refusals),
    problemList(report.dry_run_ok ? 'Dry run notes' : 'The dry run failed', report.dry_run_messages, report.dry_run_ok),
    problemList('Warnings', report.warnings, true),
  ];
  $('#check-problems').replaceChildren(...problems.filter(Boolean));
  const d = report.dry_run;
  for (const id of ['#steps-table', '#subsets-table', '#reg-table', '#bucket-table', '#bad-files-table']) $(id).replaceChildren();
  if (d) {
    const s = d.steps || {};
    table('#steps-table', ['train images (with repeats)', 'reg images', 'batches / epoch', 'updates / epoch', 'max_train_steps', 'epochs'],
      [[d.num_train_images, d.num_reg_images, d.batches_per_epoch, s.updates_per_epoch, s.max_train_steps, s.num_epochs]]);
    const subsets = [], regs = [], buckets = [];
    d.datasets.forEach((ds, i) => {
      ds.subsets.forEach((ss) => subsets.push([i, ss.image_dir, ss.image_count, ss.num_repeats, ss.is_reg ? 'reg' : 'instance',
        ss.class_tokens || '', ss.caption_extension, ss.ignored || '']));
      regs.push([i, ...Object.values(ds.reg || {})]);
      ds.buckets.forEach((b) => buckets.push([i, b.index, reso(b.resolution), b.count]));
    });
    table('#subsets-table', ['dataset', 'image_dir', 'images', 'repeats', 'kind', 'class tokens', 'captions', 'ignored'], subsets);
    const regKeys = d.datasets.length ? Object.keys(d.datasets[0].reg || {}) : [];
    table('#reg-table', ['dataset', ...regKeys.map((k) => k.replaceAll('_', ' '))], regs);
    table('#bucket-table', ['dataset', 'bucket', 'resolution', 'images'], buckets);
    const bad = [...(d.skipped || []).map((b) => [b.path, b.cause, 'skipped']), ...(d.image_warnings || []).map((b) => [b.path, b.cause, 'warning'])];
    $('#bad-files-card').classList.toggle('hidden', bad.length === 0);
    table('#bad-files-table', ['file', 'reason', ''], bad);
  }
  $('#cmdline').textContent = prepared.command;
  $('#config-toml').textContent = report.config_toml || '(not available: the flags do not parse)';
  $('#btn-start').disabled = !report.ok;
}

async function runCheck() {
  lastSetup = collectSetup();
  $('#setup-status').className = 'status-line';
  $('#setup-status').textContent = 'checking…';
  try {
    const res = await api('/api/check', lastSetup);
    $('#setup-status').textContent = '';
    renderCheck(res);
    location.hash = '#check';
  } catch (e) {
    $('#setup-status').className = 'status-line error';
    $('#setup-status').textContent = e.message;
  }
}

async function startRun() {
  if (!lastSetup) return;
  $('#btn-start').disabled = true;
  $('#start-status').className = 'status-line';
  $('#start-status').textContent = 'queueing…';
  try {
    const meta = await api('/api/runs', lastSetup);
    $('#start-status').textContent = '';
    location.hash = `#run/${encodeURIComponent(meta.id)}`;
  } catch (e) {
    $('#start-status').className = 'status-line error';
    $('#start-status').textContent = e.message;
    if (e.data && e.data.report) renderCheck({ prepared: { command: $('#cmdline').textContent }, report: e.data.report });
  } finally {
    $('#btn-start').disabled = false;
  }
}

// ---------- runs ----------

function fmtTime(secs) {
  if (!secs) return '';
  return new Date(secs * 1000).toLocaleString();
}

function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return '–';
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function fmtBytes(b) {
  if (b === undefined || b === null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function statusBadge(meta, pos) {
  const text = meta.status === 'queued' && pos !== null && pos !== undefined ? `queued (#${pos + 1})`
    : meta.status === 'running' && meta.stop_requested ? 'stopping' : meta.status;
  return el('span', { class: `badge ${meta.status}` }, text);
}

let runsTimer = null;
async function loadRuns() {
  clearTimeout(runsTimer);
  let data;
  try { data = await api('/api/runs'); } catch (_) { return; }
  const current = decodeURIComponent((location.hash.split('/')[1]) || '');
  const rows = data.runs.map((r) => {
    const m = r.meta, last = r.last_step;
    const step = last ? `${last.step} / ${m.total_steps ?? '?'}` : `0 / ${m.total_steps ?? '?'}`;
    return el('tr', { class: `clickable${m.id === current ? ' selected' : ''}`, 'data-run': m.id, onclick: () => { location.hash = `#run/${encodeURIComponent(m.id)}`; } },
      el('td', {}, m.id), el('td', {}, statusBadge(m, r.queue_position)), el('td', { class: 'num' }, step),
      el('td', { class: 'num' }, last ? Number(last.loss).toFixed(4) : ''), el('td', {}, fmtTime(m.started || m.created)),
      el('td', {}, r.report ? el('a', { href: r.report, target: '_blank', onclick: (e) => e.stopPropagation() }, 'report') : ''));
  });
  const t = $('#runs-table');
  t.replaceChildren(el('tr', {}, ['run', 'status', 'step', 'loss', 'started', ''].map((h) => el('th', {}, h))), ...rows);
  if (rows.length === 0) t.append(el('tr', {}, el('td', { colspan: 6 }, 'No runs yet in the workdir.')));
  if (!$('#tab-runs').classList.contains('hidden')) runsTimer = setTimeout(loadRuns, 3000);
}

let runView = null;

function closeRun() {
  if (runView && runView.source) runView.source.close();
  runView = null;
  $('#run-detail').classList.add('hidden');
}

function openRun(id) {
  if (runView && runView.id === id) return;
  closeRun();
  runView = { id, steps: [], validation: [], meta: null };
  $('#run-detail').classList.remove('hidden');
  $('#run-title').textContent = id;
  $('#samples').replaceChildren();
  $('#checkpoints').replaceChildren();
  $('#log-tail').textContent = '';
  const view = runView;
  const source = new EventSource(`/api/runs/${encodeURIComponent(id)}/events`);
  view.source = source;
  source.addEventListener('snapshot', (ev) => { if (runView === view) applySnapshot(JSON.parse(ev.data)); });
  source.addEventListener('end', () => { source.close(); loadRuns(); });
}

function applySnapshot(s) {
  const v = runView;
  if (s.from_offset === 0) v.steps = [];
  // A resume from an earlier state logs those steps again: the newer record wins.
  for (const r of s.steps) {
    while (v.steps.length && v.steps[v.steps.length - 1].step >= r.step) v.steps.pop();
    v.steps.push(r);
  }
  v.validation = s.validation;
  v.meta = s.meta;
  const m = s.meta;
  const badge = $('#run-status');
  badge.replaceWith(Object.assign(statusBadge(m, s.queue_position), { id: 'run-status' }));
  $('#btn-stop').disabled = !(m.status === 'running' || m.status === 'queued') || m.stop_requested;
  $('#btn-resume').disabled = s.states.length === 0 || m.status === 'running' || m.status === 'queued' || m.status === 'external';
  const sel = $('#resume-state');
  const chosen = sel.value;
  sel.replaceChildren(...s.states.map((st) => el('option', { value: st.name }, st.name)));
  if (s.states.some((st) => st.name === chosen)) sel.value = chosen;
  else if (s.states.length) sel.value = s.states[s.states.length - 1].name;
  sel.classList.toggle('hidden', s.states.length === 0);
  const report = $('#run-report');
  report.classList.toggle('hidden', !s.report);
  if (s.report) report.href = s.report;
  $('#run-log').href = `/runs/${encodeURIComponent(m.id)}/files/train.log`;
  $('#run-command').textContent = s.command || '(started from the CLI: see its train.log or report.html)';
  renderStats(v, m);
  drawCharts(v);
  renderSamples(s.samples);
  table('#checkpoints', ['file', 'size', ''], s.checkpoints.map((c) => [c.name, fmtBytes(c.bytes),
    c.url ? el('a', { href: c.url, download: c.name }, 'download') : 'folder']));
  if (s.checkpoints.length === 0) $('#checkpoints').append(el('tr', {}, el('td', { colspan: 3 }, 'none yet')));
  const log = $('#log-tail');
  const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = s.log_tail.join('\n');
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function renderStats(v, m) {
  const steps = v.steps;
  const last = steps[steps.length - 1];
  const total = m.total_steps;
  const recent = steps.slice(-20).map((r) => r.step_seconds);
  const sPerStep = recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : NaN;
  const done = last ? last.step : 0;
  const eta = total && m.status === 'running' ? (total - done) * sPerStep : NaN;
  const peak = steps.reduce((a, r) => Math.max(a, r.peak_rss_bytes || 0), 0);
  const val = v.validation[v.validation.length - 1];
  const stats = [
    ['step', total ? `${done} / ${total}` : String(done)],
    ['epoch', last ? last.epoch : '–'],
    ['s / step', isFinite(sPerStep) ? sPerStep.toFixed(2) : '–'],
    ['ETA', m.status === 'running' ? fmtDuration(eta) : '–'],
    ['loss', last ? last.loss.toFixed(4) : '–'],
    ['average loss', last ? last.avr_loss.toFixed(4) : '–'],
    ['LR (U-Net)', last ? last.lr_unet.toExponential(2) : '–'],
    ['validation loss', val && val.loss !== null ? Number(val.loss).toFixed(4) : '–'],
    ['peak memory', peak ? fmtBytes(peak) : '–'],
  ];
  $('#stats').replaceChildren(...stats.map(([k, val2]) => el('div', { class: 'stat', 'data-stat': k }, el('b', {}, val2), el('span', {}, k))));
  $('#progress-bar').style.width = total ? `${Math.min(100, (100 * done) / total)}%` : '0';
}

// A line chart in SVG: series of [x, y] points, axes with min/max labels.
function lineChart(svg, series, fmt) {
  const W = 600, H = 240, L = 56, R = 10, T = 10, B = 24;
  const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[1]));
  const ns = 'http://www.w3.org/2000/svg';
  const mk = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  svg.replaceChildren();
  svg.append(mk('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }), mk('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B }));
  if (pts.length === 0) { svg.append(mk('text', { x: W / 2 - 30, y: H / 2 }, 'no data yet')); return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(mk('text', { x: 2, y: T + 8 }, fmt(y1)), mk('text', { x: 2, y: H - B }, fmt(y0)),
    mk('text', { x: L, y: H - 6 }, `step ${x0}`), mk('text', { x: W - R - 60, y: H - 6 }, `step ${x1}`));
  for (const s of series) {
    const p = s.points.filter((q) => isFinite(q[1]));
    if (p.length === 0) continue;
    if (s.dots) {
      for (const q of p) svg.append(mk('circle', { class: s.cls, cx: sx(q[0]), cy: sy(q[1]), r: 3.5 }));
    } else {
      svg.append(mk('polyline', { class: s.cls, 'data-points': p.length, points: p.map((q) => `${sx(q[0]).toFixed(1)},${sy(q[1]).toFixed(1)}`).join(' ') }));
    }
  }
}

function drawCharts(v) {
  const st = v.steps;
  lineChart($('#loss-chart'), [
    { cls: 's1', points: st.map((r) => [r.step, r.loss]) },
    { cls: 's2', points: st.map((r) => [r.step, r.avr_loss]) },
    { cls: 's3', dots: true, points: v.validation.map((r) => [r.step, r.loss]) },
  ], (y) => y.toFixed(4));
  lineChart($('#lr-chart'), [
    { cls: 's1', points: st.map((r) => [r.step, r.lr_unet]) },
    { cls: 's2 dash', points: st.filter((r) => r.lr_text_encoder !== undefined).map((r) => [r.step, r.lr_text_encoder]) },
  ], (y) => y.toExponential(1));
}

// kohya's sample names: {name}_{step:06}_{i:02}_{time}.png or {name}_e{epoch:06}_...
function sampleLabel(name) {
  const m = name.match(/_(e?)(\d{6})_(\d{2})_\d{14}/);
  if (!m) return name;
  return `${m[1] ? 'epoch' : 'step'} ${Number(m[2])} · prompt ${Number(m[3])}`;
}

function renderSamples(samples) {
  const box = $('#samples');
  if (box.childElementCount === samples.length) return;
  const newest = samples.slice().reverse().slice(0, 24);
  box.replaceChildren(...newest.map((s) => el('figure', {},
    el('a', { href: s.url, target: '_blank' }, el('img', { src: s.url, alt: s.name, loading: 'lazy' })),
    el('figcaption', {}, sampleLabel(s.name)))));
  if (samples.length === 0) box.append(el('span', { class: 'hint' }, 'none yet (set --sample_every_n_steps and sample prompts)'));
}

async function stopRun() {
  if (!runView) return;
  try {
    const r = await api(`/api/runs/${encodeURIComponent(runView.id)}/stop`, {});
    $('#btn-stop').disabled = true;
    $('#run-title').textContent = `${runView.id}: ${r.result}`;
  } catch (e) { alert(e.message); }
}

async function resumeRun() {
  if (!runView) return;
  const state = $('#resume-state').value;
  try {
    await api(`/api/runs/${encodeURIComponent(runView.id)}/resume`, state ? { state } : {});
    const id = runView.id;
    closeRun();
    openRun(id);
    loadRuns();
  } catch (e) { alert(e.message); }
}

// ---------- start ----------

document.querySelectorAll('input[name="ds-kind"]').forEach((r) => r.addEventListener('change', () => { showDatasetKind(); saveForm(); }));
document.querySelectorAll('button.copy').forEach((b) => b.addEventListener('click', () => {
  navigator.clipboard.writeText($(`#${b.dataset.copy}`).textContent).then(() => { b.textContent = 'Copied'; setTimeout(() => { b.textContent = 'Copy'; }, 1200); });
}));
$('#btn-check').addEventListener('click', runCheck);
$('#btn-start').addEventListener('click', startRun);
$('#btn-stop').addEventListener('click', stopRun);
$('#btn-resume').addEventListener('click', resumeRun);
window.addEventListener('hashchange', route);
// The token is in the cookie now: keep it out of the address bar and the history.
if (location.search.includes('token=')) history.replaceState(null, '', location.pathname + location.hash);
loadSetup().then(route, (e) => { $('#setup-status').className = 'status-line error'; $('#setup-status').textContent = e.message; });
