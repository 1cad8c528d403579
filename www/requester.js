// The requester page: the recent jobs and their verified units, polled from GET /v1/jobs.
const $ = (id) => document.getElementById(id);
$('base').textContent = `${location.origin}/v1`;
$('key').value = sessionStorage.getItem('tabula-api-key') || '';
let timer = null;

function cell(text) {
  const td = document.createElement('td');
  td.textContent = text;
  return td;
}

async function refresh() {
  const key = $('key').value.trim();
  if (!key) return;
  let body;
  try {
    const r = await fetch('/v1/jobs', { headers: { authorization: `Bearer ${key}` } });
    body = await r.json();
    if (!r.ok) {
      $('note').textContent = body.error ? body.error.message : `HTTP ${r.status}`;
      $('jobs').hidden = true;
      return;
    }
  } catch (e) {
    $('note').textContent = `The coordinator did not answer: ${e.message || e}`;
    return;
  }
  const rows = body.data.map((job) => {
    const tr = document.createElement('tr');
    tr.dataset.status = job.status;
    const progress = document.createElement('td');
    const bar = document.createElement('progress');
    bar.max = Math.max(job.units_total, 1);
    bar.value = job.units_verified;
    progress.append(bar, ` ${job.units_verified}/${job.units_total}`);
    tr.append(cell(job.id), cell(job.kind), cell(`${job.model} (${job.precision})`), progress,
      cell(job.status), cell(new Date(job.created_ms).toLocaleString()));
    return tr;
  });
  $('jobs').tBodies[0].replaceChildren(...rows);
  $('jobs').hidden = rows.length === 0;
  $('note').textContent = rows.length ? `${rows.length} jobs; updated ${new Date().toLocaleTimeString()}.` : 'No jobs yet.';
}

$('key-form').onsubmit = (e) => {
  e.preventDefault();
  sessionStorage.setItem('tabula-api-key', $('key').value.trim());
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, 2000);
};
if ($('key').value) $('key-form').requestSubmit();
