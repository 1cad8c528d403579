// The volunteer's Web Worker: the I/O half of the worker loop. Everything that reads or
// writes a protocol frame, signs, hashes or computes is in Rust (crates/web, `Volunteer`); this
// file keeps the WebSocket, the key in IndexedDB, the weight cache (Cache API), timers, the
// throttle, and reports status to the page (or the extension's offscreen document).
//
// Messages in:  {type: 'start', coordinator, backend, stageMb, stageLinks}  {type: 'stop'}
//               {type: 'throttle', value: 0.1..1}      {type: 'payout', address}
//               {type: 'peer-signal-out' | 'peer-channel', ...}  (from www/peers.js)
// Messages out: {type: 'status', ...}  (see `report`)
//               {type: 'peer-open' | 'peer-signal' | 'peer-close', ...}  (to www/peers.js: a
//               worker cannot open an RTCPeerConnection, so the document does)

// Two builds of the same engine: `pkg-relaxed` uses wasm relaxed SIMD for exact precision's
// int8 dot products (same bits, ~20 % faster); `pkg` runs everywhere. This probe module
// (i8x16.relaxed_swizzle) validates only where relaxed SIMD exists.
const RELAXED_SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0,
  10, 15, 1, 13, 0, 65, 1, 253, 15, 65, 2, 253, 15, 253, 128, 2, 11]);

async function loadEngine() {
  const relaxed = WebAssembly.validate(RELAXED_SIMD_PROBE);
  try {
    const pkg = await import(relaxed ? './pkg-relaxed/tabula_web.js' : './pkg/tabula_web.js');
    await pkg.default();
    return { ...pkg, relaxed };
  } catch (e) {
    if (!relaxed) throw e;
    const pkg = await import('./pkg/tabula_web.js'); // a site without the relaxed build
    await pkg.default();
    return { ...pkg, relaxed: false };
  }
}

const KEY_DB = 'tabula';
const KEY_STORE = 'keys';
const KEY_NAME = 'worker-seed-v1';
const WEIGHTS_CACHE = 'tabula-weights-v1';

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

// A model file by its SHA-256, from the Cache API or else the coordinator. The hash is checked
// in Rust before the file is used; a file that fails it is evicted (see `computeUnit`).
async function weights(file) {
  const url = new URL(`/v1/weights/${file.sha256}`, coordinator).href;
  // Keeping a copy is a saving, not a condition: a browser out of disk space or quota
  // refuses it, and the unit still computes from the downloaded bytes.
  const cache = await caches.open(WEIGHTS_CACHE).catch(() => null);
  const cached = cache && await cache.match(url).catch(() => null);
  if (cached) return new Uint8Array(await cached.arrayBuffer());
  report({ message: `downloading ${file.role} weights (${(file.size / 1e6).toFixed(1)} MB)` });
  const fetched = await fetch(url);
  if (!fetched.ok) throw new Error(`weights ${file.sha256}: HTTP ${fetched.status}`);
  const bytes = new Uint8Array(await fetched.arrayBuffer());
  try {
    if (!cache) throw new Error('no Cache API');
    await cache.put(url, new Response(bytes, { headers: { 'content-type': 'application/octet-stream' } }));
  } catch (e) {
    report({ message: `computing without keeping the weights (the browser would not store them: ${e.message || e})` });
  }
  return bytes;
}

async function evict(files) {
  const cache = await caches.open(WEIGHTS_CACHE).catch(() => null);
  if (!cache) return;
  for (const f of files) await cache.delete(new URL(`/v1/weights/${f.sha256}`, coordinator).href).catch(() => {});
}

// Frames are binary; replies inside frame events arrive as plain arrays of bytes.
function send(frame) {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(frame instanceof Uint8Array ? frame : new Uint8Array(frame));
  }
}

function askForWork(delayMs = 0) {
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => { if (running) send(volunteer.readyFrame()); }, delayMs);
}

async function computeUnit(event) {
  report({ phase: 'working', message: `computing a ${event.model} unit (${event.precision})` });
  const started = performance.now();
  let frame;
  try {
    const files = [];
    for (const f of event.files) files.push(await weights(f));
    frame = await volunteer.run(files);
  } catch (e) {
    const message = String(e && e.message || e);
    if (message.includes('hashes to')) await evict(event.files);
    if (!running) return; // stopped meanwhile: `stop` already released the unit
    const release = volunteer.releaseFrame();
    if (release) send(release);
    report({ phase: 'error', message: `unit failed: ${message}` });
    if (running) askForWork(2000);
    return;
  }
  if (!running) return; // stopped while computing: the release was already sent
  send(frame);
  const now = performance.now();
  recent.push(now);
  while (recent.length > 20) recent.shift();
  const spanMin = recent.length > 1 ? (recent[recent.length - 1] - recent[0]) / 60000 : 0;
  report({
    units: state.units + 1,
    lastUnitMs: Math.round(now - started),
    unitsPerMinute: spanMin > 0 ? (recent.length - 1) / spanMin : 0,
    phase: 'working',
    message: 'submitted; asking for the next unit',
  });
  // The throttle: at 0.5 the worker rests as long as it computed.
  const rest = state.throttle >= 1 ? 0 : (now - started) * (1 / state.throttle - 1);
  askForWork(rest);
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
    for (const f of event.files) files.push(await weights(f));
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
    if (message.includes('hashes to')) await evict(event.files);
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
      report({ phase: 'waiting', message: 'connected', creditMicro: event.creditMicro });
      clearInterval(heartbeat);
      heartbeat = setInterval(() => send(volunteer.heartbeatFrame()), Math.max(100, event.heartbeatMs));
      if (state.payoutAddress) {
        try { send(volunteer.payoutFrame(state.payoutAddress)); } catch (e) { report({ message: e.message }); }
      }
      askForWork();
      break;
    case 'assign': computeUnit(event); break;
    case 'busy': send(event.reply); break;
    case 'decline': send(event.reply); break;
    case 'stage': runStage(event); break;
    case 'signal':
      postMessage({ type: 'peer-signal', id: `${event.session}/${event.peer}`, signal: event.signal, text: event.text });
      break;
    case 'stageEnd': endStage(event.session); break;
    case 'ignored': break;
    case 'noWork':
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
    const frame = volunteer.releaseFrame();
    if (frame) send(frame);
  }
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
    case 'throttle': report({ throttle: Math.min(1, Math.max(0.1, Number(msg.value) || 1)) }); break;
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
