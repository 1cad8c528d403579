// The popup: start/stop and the same numbers as the volunteer page, read from the status the
// offscreen worker reports (kept by the service worker in chrome.storage.session).
const $ = (id) => document.getElementById(id);
const DEFAULT_COORDINATOR = 'http://127.0.0.1:8080';

function render(status = { phase: 'stopped' }) {
  const running = !['stopped', 'error'].includes(status.phase);
  $('toggle').textContent = running ? 'Stop' : 'Start contributing';
  $('toggle').classList.toggle('running', running);
  const phases = { stopped: 'Not running.', starting: 'Starting…', connecting: 'Connecting…', waiting: 'Connected, waiting for work.', working: 'Working.', error: 'Problem:' };
  const detail = ['starting', 'connecting', 'working', 'error'].includes(status.phase) ? status.message || '' : '';
  $('phase').textContent = `${phases[status.phase] || ''} ${detail}`.trim();
  $('device').textContent = status.device || '—';
  $('threads').textContent = status.threads > 1 ? `${status.threads} (of ${navigator.hardwareConcurrency || 1} CPU cores)` : String(status.threads || '—');
  $('units').textContent = String(status.units || 0);
  $('speed').textContent = status.unitsPerMinute ? `${status.unitsPerMinute.toFixed(1)} units/min` : '—';
  $('verified').textContent = ((status.creditMicro || 0) / 1e6).toFixed(2);
  if (status.publicKey) $('key').textContent = status.publicKey;
  if (status.keyNote) $('key-note').textContent = status.keyNote;
  $('toggle').dataset.running = String(running);
}

async function command(cmd) {
  const r = await chrome.runtime.sendMessage({ target: 'background', type: 'command', command: cmd });
  if (r && !r.ok) $('phase').textContent = `Problem: ${r.error}`;
}

const { coordinator = DEFAULT_COORDINATOR } = await chrome.storage.local.get('coordinator');
$('coordinator').value = coordinator;
$('coordinator').onchange = () => chrome.storage.local.set({ coordinator: $('coordinator').value.trim() });
const { status } = await chrome.storage.session.get('status');
render(status);
chrome.storage.session.onChanged.addListener((changes) => { if (changes.status) render(changes.status.newValue); });

// Pending credit (results in, not yet verified) from the coordinator's public ledger.
setInterval(async () => {
  const key = $('key').textContent;
  if (!/^[0-9a-f]{64}$/.test(key)) return;
  try {
    const r = await fetch(`${new URL($('coordinator').value).origin}/v1/ledger/${key}`);
    if (r.ok) $('pending').textContent = ((await r.json()).pending_credit || 0).toFixed(2);
  } catch { /* coordinator unreachable: keep the last number */ }
}, 3000);

$('toggle').onclick = async () => {
  if ($('toggle').dataset.running === 'true') return command({ type: 'stop' });
  let url;
  try {
    url = new URL($('coordinator').value.trim() || DEFAULT_COORDINATOR).origin;
  } catch {
    $('phase').textContent = 'The coordinator address is not a URL (e.g. http://127.0.0.1:8080).';
    return;
  }
  await chrome.storage.local.set({ coordinator: url });
  return command({ type: 'start', coordinator: url, backend: 'auto' });
};
