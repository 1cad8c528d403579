// The volunteer page: one button, the live numbers, and the settings. The work itself runs in
// worker.js (a Web Worker), so the page stays responsive while the GPU computes.

import { hostPeers } from './peers.js';

const $ = (id) => document.getElementById(id);
const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
hostPeers(worker); // pipeline stages' peer connections live here (workers cannot open them)
const settings = JSON.parse(localStorage.getItem('tabula-settings') || '{}');
let status = { phase: 'stopped' };
let wanted = false; // the volunteer pressed start (pauses do not change this)
let pausedBy = ''; // '', 'hidden' or 'battery'
let battery = null;

function save() {
  localStorage.setItem('tabula-settings', JSON.stringify(settings));
}

function credit(micro) {
  const c = micro / 1e6;
  return c >= 100 ? c.toFixed(0) : c.toFixed(2);
}

function render() {
  const running = !['stopped', 'error'].includes(status.phase);
  $('toggle').textContent = wanted ? 'Stop' : 'Start contributing';
  $('toggle').classList.toggle('running', wanted);
  const phases = {
    stopped: wanted && pausedBy ? `Paused (${pausedBy === 'hidden' ? 'tab hidden' : 'on battery'}).` : 'Not running.',
    starting: 'Starting…', connecting: 'Connecting…', waiting: 'Connected, waiting for work.',
    working: 'Working.', error: 'Problem:',
  };
  const detail = ['starting', 'connecting', 'working', 'error'].includes(status.phase) ? status.message || '' : '';
  $('phase').textContent = `${phases[status.phase] || ''} ${detail}`.trim();
  $('device').textContent = status.device || '—';
  $('threads').textContent = status.threads ? threadsText(status.threads) : '—';
  $('units').textContent = String(status.units || 0);
  $('speed').textContent = running && status.unitsPerMinute
    ? `${status.unitsPerMinute.toFixed(1)} units/min` : (status.lastUnitMs ? `${(status.lastUnitMs / 1000).toFixed(1)} s/unit` : '—');
  $('verified').textContent = credit(status.creditMicro || 0);
  if (status.publicKey) $('key').textContent = status.publicKey;
  if (status.keyNote) $('key-note').textContent = status.keyNote;
  if (status.stageMb !== undefined) $('stage-mb').placeholder = `${status.stageMb} (default)`;
}

// Units computed side by side: one compute worker each, a share of the cores (the setting
// below). A GPU computes one unit at a time.
function threadsText(n) {
  const cores = navigator.hardwareConcurrency || 1;
  return n > 1 ? `${n} (of ${cores} CPU cores)` : '1';
}

worker.onerror = (e) => {
  console.error('volunteer worker:', e.message);
  status = { phase: 'error', message: `the compute engine stopped (${e.message || 'is www/pkg built? run npm run build'})` };
  wanted = false;
  render();
};

worker.onmessage = (m) => {
  if (m.data.type !== 'status') return;
  status = m.data;
  self.tabulaStatus = status; // the worker's last report, for tests and the curious
  if (status.phase === 'error' && status.message.startsWith('the coordinator refused')) wanted = false;
  render();
};

function apply() {
  const shouldRun = wanted && !pausedBy;
  const running = !['stopped', 'error'].includes(status.phase);
  if (shouldRun && !running) {
    worker.postMessage({
      type: 'start', backend: settings.backend || 'auto', coordinator: location.origin,
      stageMb: settings.stageMb ?? null, stageLinks: settings.stageLinks || 'auto',
    });
  }
  if (!shouldRun && running) worker.postMessage({ type: 'stop' });
  render();
}

function updatePause() {
  if (settings.pauseHidden && document.visibilityState === 'hidden') pausedBy = 'hidden';
  else if (settings.pauseBattery !== false && battery && !battery.charging) pausedBy = 'battery';
  else pausedBy = '';
  apply();
}

$('toggle').onclick = () => {
  wanted = !wanted;
  updatePause();
};

// Settings, remembered in localStorage.
$('throttle').value = String(Math.round((settings.throttle || 1) * 100));
$('throttle-out').textContent = $('throttle').value;
$('throttle').oninput = () => {
  settings.throttle = Number($('throttle').value) / 100;
  $('throttle-out').textContent = $('throttle').value;
  worker.postMessage({ type: 'throttle', value: settings.throttle });
  save();
};
worker.postMessage({ type: 'throttle', value: settings.throttle || 1 });
$('pause-hidden').checked = !!settings.pauseHidden;
$('pause-hidden').onchange = () => { settings.pauseHidden = $('pause-hidden').checked; save(); updatePause(); };
$('pause-battery').checked = settings.pauseBattery !== false;
$('pause-battery').onchange = () => { settings.pauseBattery = $('pause-battery').checked; save(); updatePause(); };
$('backend').value = settings.backend || 'auto';
$('backend').onchange = () => { settings.backend = $('backend').value; save(); };
// Pipeline stages: the memory this page may give a slice of a large model (empty: the
// default the worker derives from the device's memory; 0: no stages).
$('stage-mb').value = settings.stageMb ?? '';
$('stage-mb').onchange = () => {
  const v = $('stage-mb').value.trim();
  settings.stageMb = v === '' ? null : Math.max(0, Math.min(4096, Math.round(Number(v) || 0)));
  save();
};
document.addEventListener('visibilitychange', updatePause);
if (navigator.getBattery) {
  navigator.getBattery().then((b) => {
    battery = b;
    b.addEventListener('chargingchange', updatePause);
    updatePause();
  }).catch(() => {});
}

// Payout address: pasted, or read from an injected wallet (EIP-1193) when there is one.
if (settings.payout) $('payout').value = settings.payout;
$('payout-form').onsubmit = (e) => {
  e.preventDefault();
  const address = $('payout').value.trim();
  if (!/^0x[0-9a-fA-F]{40}$/.test(address)) {
    $('phase').textContent = 'A payout address is 0x followed by 40 hex digits.';
    return;
  }
  settings.payout = address;
  save();
  worker.postMessage({ type: 'payout', address });
  refreshChain();
};
if (window.ethereum) {
  $('wallet').hidden = false;
  $('wallet').onclick = async () => {
    try {
      const [address] = await window.ethereum.request({ method: 'eth_requestAccounts' });
      $('payout').value = address;
      $('payout-form').requestSubmit();
    } catch (e) {
      $('phase').textContent = `The wallet did not share an address: ${e.message || e}`;
    }
  };
}
if (settings.payout) worker.postMessage({ type: 'payout', address: settings.payout });

// Pending credit (results in, not yet verified), from the public ledger; verified credit comes
// live from the signed receipts the worker receives.
async function refreshLedger() {
  if (!status.publicKey) return;
  try {
    const r = await fetch(`/v1/ledger/${status.publicKey}`);
    if (r.ok) {
      const entry = await r.json();
      $('pending').textContent = (entry.pending_credit || 0).toFixed(2);
    }
  } catch { /* offline: keep the last numbers */ }
}
setInterval(refreshLedger, 3000);

// On-chain credit of the payout address: its token balance, and what the latest epoch lets it
// claim (the coordinator relays the claim and pays the gas).
async function refreshChain() {
  if (!settings.payout) return;
  try {
    const r = await fetch(`/v1/ledger/proof/${settings.payout}`);
    const body = await r.json();
    if (r.ok) {
      const balance = Number(body.on_chain.balance_micro) / 1e6;
      const claimable = (Number(body.cumulative_amount) - Number(body.on_chain.claimed_micro)) / 1e6;
      $('onchain').textContent = balance.toFixed(2);
      $('claimable').textContent = claimable > 0
        ? `${claimable.toFixed(2)} credits of epoch ${body.epoch} are ready to claim. `
        : '';
      $('claim-row').hidden = !(claimable > 0);
    } else if (r.status === 404) {
      $('onchain').textContent = '0.00';
      $('claim-row').hidden = true;
    }
  } catch { /* offline: keep the last numbers */ }
}
$('claim').onclick = async () => {
  $('claim').disabled = true;
  try {
    const r = await fetch(`/v1/ledger/claim/${settings.payout}`, { method: 'POST' });
    const body = await r.json();
    $('phase').textContent = r.ok
      ? `Claimed: your address now holds ${(Number(body.on_chain.balance_micro) / 1e6).toFixed(2)} credit tokens.`
      : `The claim failed: ${body.error?.message || r.status}`;
  } catch (e) {
    $('phase').textContent = `The claim failed: ${e.message || e}`;
  } finally {
    $('claim').disabled = false;
    refreshChain();
  }
};
setInterval(refreshChain, 10000);
refreshChain();
render();
