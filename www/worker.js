// The volunteer's Web Worker: the I/O half of the worker loop. Everything that reads or
// writes a protocol frame, signs, hashes or computes is in Rust (crates/web, `Volunteer`); this
// file keeps the WebSocket, the key in IndexedDB, the weight cache (Cache API), timers, the
// throttle, and reports status to the page (or the extension's offscreen document).
//
// Messages in:  {type: 'start', coordinator, backend, stageMb, stageLinks}  {type: 'stop'}
//               {type: 'throttle', value: 0.1..1}      {type: 'payout', address}
//               {type: 'peer-signal-out' | 'peer-channel', ...}  (from www/peers.js)
// Messages out: {type: 'status', ...}  (see `report`)
// With several threads (the throttle's share of the CPU's cores, on the CPU path) the units
// compute in a pool of compute workers (compute.js); one key and one session either way.
//               {type: 'peer-open' | 'peer-signal' | 'peer-close', ...}  (to www/peers.js: a
//               worker cannot open an RTCPeerConnection, so the document does)

import { evict, loadEngine, weights } from './engine.js';

const KEY_DB = 'tabula';
const KEY_STORE = 'keys';
const KEY_NAME = 'worker-seed-v1';

const state = {
  phase: 'stopped', // stopped | starting | connecting | working | waiting | error
  message: '',
  device: '',
  publicKey: '',
  units: 0,
  creditMicro: 0,
  lastUnitMs: 0,
  unitsPerMinute: 0,
  throttle: 1,
  payoutAddress: '',
  stageMb: 0, // memory offered to pipeline stages (0: none)
  stages: 0, // pipeline sessions served
  threads: 1, // units computed at once (compute workers when more than one)
  peakParallel: 0, // the most units computed at once so far
  computing: 0, // units computing now
};
let volunteer = null;
let socket = null;
let running = false;
let heartbeat = null;
let retryTimer = null;
let backoffMs = 500;
let coordinator = '';
let backend = 'auto';
let stageSession = ''; // the pipeline session this page serves, if any
const recent = []; // finish times of recent units, for throughput
const MAX_THREADS = 16; // the worker core's limit (MAX_PARALLEL)
let pool = []; // compute workers: {worker, lease (the unit it computes, or null), started}
let asked = 0; // `Ready` frames not answered yet
let duty = 1; // the share of time a single compute thread computes (the throttle below a core)

function report(extra = {}) {
  Object.assign(state, extra);
  postMessage({ type: 'status', ...state });
}

// The worker's ed25519 seed, created once per browser profile and kept in IndexedDB. A
// browser that will not store it (private mode, no disk space or quota left) still computes,
// under a key that lasts as long as the page; the page says so next to the key.
async function loadSeed() {
  try {
    return await storedSeed();
  } catch (e) {
    report({ keyNote: `This browser would not keep your key (${e && e.message || e}): credit goes to a key that lasts until this page closes. Set a payout address to keep it.` });
    return crypto.getRandomValues(new Uint8Array(32));
  }
}

async function storedSeed() {
  const db = await new Promise((resolve, reject) => {
    const open = indexedDB.open(KEY_DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(KEY_STORE);
    open.onsuccess = () => resolve(open.result);
    open.onerror = () => reject(open.error);
  });
  const get = (store) => new Promise((resolve, reject) => {
    const r = store.get(KEY_NAME);
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
  let seed = await get(db.transaction(KEY_STORE).objectStore(KEY_STORE));
  if (!(seed instanceof Uint8Array) || seed.length !== 32) {
    seed = crypto.getRandomValues(new Uint8Array(32));
    await new Promise((resolve, reject) => {
      const tx = db.transaction(KEY_STORE, 'readwrite');
      tx.objectStore(KEY_STORE).put(seed, KEY_NAME);
      tx.oncomplete = resolve;
      // A write over quota aborts the transaction without an error event.
      tx.onerror = tx.onabort = () => reject(tx.error || new Error('the key could not be stored'));
    });
  }
  db.close();
  return seed;
}

// Frames are binary; replies inside frame events arrive as plain arrays of bytes.
function send(frame) {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(frame instanceof Uint8Array ? frame : new Uint8Array(frame));
  }
}

// Asks for as many units as the worker has room for (one `Ready` each; every `Ready` gets an
// `assign`, a `busy` or a `noWork`).
function askForWork(delayMs = 0) {
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => {
    if (!running || !volunteer || !socket || socket.readyState !== WebSocket.OPEN) return;
    while (volunteer.wantsUnits() > asked) {
      send(volunteer.readyFrame());
      asked++;
    }
  }, delayMs);
}

function answered() {
  asked = Math.max(0, asked - 1);
}

// The logical cores the browser reports, within what the worker computes at once.
function cores() {
  return Math.max(1, Math.min(MAX_THREADS, Math.floor(Number(self.navigator && self.navigator.hardwareConcurrency) || 1)));
}

// The throttle as a share of the whole CPU: 100 % runs a compute worker per core, 50 % half
// as many; below one core's worth, one worker computes and rests in proportion.
function applyThrottle() {
  const share = state.throttle * cores();
  const threads = volunteer ? volunteer.setThreads(Math.max(1, Math.floor(share + 1e-9))) : 1;
  duty = Math.min(1, share / threads);
  // Compute workers beyond the number idle now are let go (their memory with them).
  for (const slot of pool.filter((p) => !p.lease).slice(Math.max(0, threads - busyCount()))) retire(slot);
  report({ threads });
  if (running) askForWork();
}

function busyCount() {
  return pool.filter((p) => p.lease).length;
}

function retire(slot) {
  slot.worker.terminate();
  pool = pool.filter((p) => p !== slot);
}

// After a unit: throughput for the page, then the rest the throttle asks for.
function unitDone(started) {
  unitOver();
  const now = performance.now();
  recent.push(now);
  while (recent.length > 20) recent.shift();
  const spanMin = recent.length > 1 ? (recent[recent.length - 1] - recent[0]) / 60000 : 0;
  report({
    units: state.units + 1,
    lastUnitMs: Math.round(now - started),
    unitsPerMinute: spanMin > 0 ? (recent.length - 1) / spanMin : 0,
    phase: 'working', // until a `noWork` says otherwise
    message: 'submitted; asking for the next unit',
  });
  // At a duty of 0.5 the worker rests as long as it computed.
  askForWork(duty >= 1 ? 0 : (now - started) * (1 / duty - 1));
}

function unitFailed(lease, message) {
  if (!running) return; // stopped meanwhile: `stop` already released the unit
  unitOver();
  const release = volunteer.releaseFrame(lease);
  if (release) send(release);
  report({ phase: 'error', message: `unit failed: ${message}` });
  askForWork(2000);
}

function computeUnit(event) {
  answered();
  report({ phase: 'working', message: `computing a ${event.model} unit (${event.precision})`, computing: state.computing + 1 });
  report({ peakParallel: Math.max(state.peakParallel, state.computing) });
  if (state.threads > 1) dispatch(event);
  else computeHere(event);
}

// A unit is over (submitted, failed or given back).
function unitOver() {
  report({ computing: Math.max(0, state.computing - 1) });
}

// One thread: the unit computes in this worker (on the GPU, or the CPU).
async function computeHere(event) {
  const started = performance.now();
  let frame;
  try {
    const files = [];
    for (const f of event.files) files.push(await weights(coordinator, f, report));
    frame = await volunteer.run(event.lease, files);
  } catch (e) {
    const message = String(e && e.message || e);
    if (message.includes('hashes to')) await evict(coordinator, event.files);
    unitFailed(event.lease, message);
    return;
  }
  if (!running) return; // stopped while computing: the release was already sent
  send(frame);
  unitDone(started);
}

// Several threads: the unit goes to an idle compute worker (compute.js), started if needed;
// this worker keeps the key, the session and the heartbeat, and signs the output.
function dispatch(event) {
  let slot = pool.find((p) => !p.lease);
  if (!slot) {
    const worker = new Worker(new URL('./compute.js', import.meta.url), { type: 'module' });
    slot = { worker, lease: null, started: 0 };
    worker.onmessage = (m) => fromCompute(slot, m.data || {});
    worker.onerror = (e) => {
      // The compute worker died (out of memory, a trap): its unit goes back, it is replaced.
      const lease = slot.lease;
      retire(slot);
      if (lease) unitFailed(lease, `the compute worker stopped (${e.message || 'no reason given'})`);
    };
    pool.push(slot);
  }
  slot.lease = event.lease;
  slot.started = performance.now();
  let task;
  try {
    task = volunteer.taskFrame(event.lease);
  } catch (e) {
    slot.lease = null;
    unitFailed(event.lease, e.message || e);
    return;
  }
  // The session's worker downloads each file once; the compute workers read the cache.
  Promise.all(event.files.map(prefetch))
    .catch(() => {}) // a compute worker downloads what the cache lacks
    .then(() => slot.worker.postMessage({ type: 'unit', id: event.lease, coordinator, task }, [task.buffer]));
}

const prefetched = new Map(); // sha256 -> a download in flight or done
function prefetch(file) {
  if (!prefetched.has(file.sha256)) {
    prefetched.set(file.sha256, weights(coordinator, file, report).then(() => undefined, (e) => {
      prefetched.delete(file.sha256);
      throw e;
    }));
  }
  return prefetched.get(file.sha256);
}

function fromCompute(slot, msg) {
  if (msg.type === 'status') { report({ message: msg.message }); return; }
  if (msg.id !== slot.lease) return; // a unit given back meanwhile (stop pressed)
  slot.lease = null;
  if (msg.type === 'failed') { unitFailed(msg.id, msg.message); return; }
  if (!running) return;
  let frame;
  try {
    frame = volunteer.submitFrame(msg.id, msg.output);
  } catch (e) {
    report({ message: `not submitted: ${e.message || e}` });
    unitOver();
    askForWork();
    return;
  }
  send(frame);
  if (pool.length > state.threads) retire(slot);
  unitDone(slot.started);
}

// The memory a pipeline stage may use by default: a quarter of what the device reports
// (navigator.deviceMemory, in GB, rounded down by the browser), within what a wasm page can
// address, and on WebGPU (where the stage computes) within the largest buffer the adapter
// grants.
function defaultStageMb() {
  const gb = Number(self.navigator && self.navigator.deviceMemory) || 2;
  const adapter = volunteer && volunteer.stageLimitMb();
  return Math.max(64, Math.min(1024, Math.floor(gb * 1024 / 4), adapter ?? Infinity));
}

// A pipeline stage: peer connections opened by the document while the stage's pieces
// download, then the stage runs in Rust until the coordinator ends the session.
async function runStage(event) {
  const what = `stage ${event.stage + 1} of ${event.stages} of a large model (layers ${event.layers[0]}–${event.layers[1] - 1})`;
  stageSession = event.session;
  report({ phase: 'working', message: `joining a pipeline: ${what}` });
  if (event.direct) {
    for (const p of event.peers) postMessage({ type: 'peer-open', id: `${event.session}/${p.peer}`, offerer: p.offerer });
  }
  const files = [];
  try {
    for (const f of event.files) files.push(await weights(coordinator, f, report));
  } catch (e) {
    const frame = volunteer.abandonStage(`the stage's weights did not download: ${e.message || e}`);
    if (frame) send(frame);
    endStage(event.session);
    report({ phase: 'error', message: `could not join the pipeline: ${e.message || e}` });
    if (running) askForWork(2000);
    return;
  }
  report({ phase: 'working', message: `running ${what}` });
  try {
    await volunteer.runStage(files, send);
    report({ stages: state.stages + 1, message: `finished ${what}` });
  } catch (e) {
    const message = String(e && e.message || e);
    if (message.includes('hashes to')) await evict(coordinator, event.files);
    report({ message: `the pipeline stage stopped: ${message}` });
  } finally {
    endStage(event.session);
    if (running) askForWork();
  }
}

function endStage(session) {
  if (stageSession === session) stageSession = '';
  postMessage({ type: 'peer-close', session });
}

function onFrame(bytes) {
  let event;
  try {
    event = volunteer.onFrame(new Uint8Array(bytes));
  } catch (e) {
    report({ phase: 'error', message: `bad frame from the coordinator: ${e.message || e}` });
    return;
  }
  switch (event.kind) {
    case 'challenge': send(event.reply); break;
    case 'welcome':
      backoffMs = 500;
      asked = 0; // a new session: nothing asked in it yet
      report({ phase: 'waiting', message: 'connected', creditMicro: event.creditMicro });
      clearInterval(heartbeat);
      heartbeat = setInterval(() => send(volunteer.heartbeatFrame()), Math.max(100, event.heartbeatMs));
      if (state.payoutAddress) {
        try { send(volunteer.payoutFrame(state.payoutAddress)); } catch (e) { report({ message: e.message }); }
      }
      askForWork();
      break;
    case 'assign': computeUnit(event); break;
    case 'busy': answered(); send(event.reply); break;
    case 'decline': send(event.reply); break;
    case 'stage': runStage(event); break;
    case 'signal':
      postMessage({ type: 'peer-signal', id: `${event.session}/${event.peer}`, signal: event.signal, text: event.text });
      break;
    case 'stageEnd': endStage(event.session); break;
    case 'ignored': break;
    case 'noWork':
      answered();
      report({ phase: 'waiting', message: 'no work right now; asking again soon' });
      askForWork(Math.min(Math.max(event.retryMs, 50), 60000));
      break;
    case 'accepted': break;
    case 'rejected': report({ message: `result rejected: ${event.reason}` }); break;
    case 'credited': report({ creditMicro: state.creditMicro + event.creditMicro }); break;
    case 'payoutLinked': report({ payoutAddress: event.address, message: `payout address ${event.address} linked` }); break;
    case 'badReceipt': break;
    case 'error':
      // A passing failure (a silent socket, trouble on the coordinator's side): the socket
      // closes and `onclose` reconnects with backoff. A refusal for good stops the worker.
      if (event.retry) report({ phase: 'connecting', message: `the coordinator ended the session: ${event.message}` });
      else { report({ phase: 'error', message: `the coordinator refused this worker: ${event.message}` }); stop(false); }
      break;
  }
}

function connect() {
  if (!running) return;
  const url = new URL('/v1/worker', coordinator);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  report({ phase: 'connecting', message: `connecting to ${url.host}` });
  socket = new WebSocket(url.href);
  socket.binaryType = 'arraybuffer';
  socket.onmessage = (m) => { if (m.data instanceof ArrayBuffer) onFrame(m.data); };
  socket.onclose = () => {
    clearInterval(heartbeat);
    socket = null;
    asked = 0;
    // A stage cannot outlive its session's socket: the coordinator rebuilds without it.
    if (volunteer) volunteer.endStage();
    if (!running) return;
    report({ phase: 'connecting', message: `connection lost; retrying in ${(backoffMs / 1000).toFixed(1)} s` });
    setTimeout(connect, backoffMs);
    backoffMs = Math.min(backoffMs * 2, 30000);
  };
}

async function start(options) {
  if (running) return;
  coordinator = options.coordinator || self.location.origin;
  backend = options.backend || 'auto';
  running = true;
  report({ phase: 'starting', message: 'loading the compute engine' });
  try {
    if (!volunteer) {
      const { Volunteer } = await loadEngine();
      const seed = await loadSeed();
      const ua = (self.navigator && self.navigator.userAgent || '').includes('Chrome') ? 'chromium' : 'browser';
      volunteer = await Volunteer.create(seed, backend, `tabula-web/0.1.0 ${ua}`);
      // Which device computes and why (the engine calibrated both, or the settings chose).
      report({ device: volunteer.device(), publicKey: volunteer.publicKey() });
    }
    applyThrottle();
    const stageMb = Number.isFinite(options.stageMb) && options.stageMb >= 0 ? Math.floor(options.stageMb) : defaultStageMb();
    volunteer.setStages(stageMb, options.stageLinks !== 'relay');
    report({ stageMb });
  } catch (e) {
    running = false;
    report({ phase: 'error', message: `could not start: ${e.message || e}` });
    return;
  }
  connect();
}

function stop(release = true) {
  running = false;
  clearTimeout(retryTimer);
  clearInterval(heartbeat);
  if (volunteer && release) {
    // Every unit held goes back (one per compute worker).
    for (let frame = volunteer.releaseFrame(); frame; frame = volunteer.releaseFrame()) send(frame);
  }
  for (const slot of pool) slot.worker.terminate();
  pool = [];
  state.computing = 0;
  if (volunteer) volunteer.endStage();
  if (socket) socket.close(1000, 'stopped by the volunteer');
  socket = null;
  report({ phase: release ? 'stopped' : 'error', message: release ? 'stopped' : state.message });
}

onmessage = (m) => {
  const msg = m.data || {};
  switch (msg.type) {
    case 'start': start(msg); break;
    case 'stop': stop(); break;
    case 'throttle':
      report({ throttle: Math.min(1, Math.max(0.1, Number(msg.value) || 1)) });
      applyThrottle();
      break;
    case 'payout':
      state.payoutAddress = msg.address;
      if (volunteer && running) {
        try { send(volunteer.payoutFrame(msg.address)); } catch (e) { report({ message: e.message }); }
      }
      break;
    case 'status': report(); break;
    case 'peer-signal-out': {
      const [session, peer] = String(msg.id).split('/');
      try { send(volunteer.signalFrame(session, peer, msg.signal, msg.text)); } catch (e) { console.warn(`signal to ${peer}: ${e.message || e}`); }
      break;
    }
    case 'peer-channel': {
      const [session, peer] = String(msg.id).split('/');
      try { volunteer.attachChannel(session, peer, msg.channel); } catch { msg.channel.close(); }
      break;
    }
  }
};
