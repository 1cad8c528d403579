// The browser volunteer end to end: a fresh Chromium profile opens the page the coordinator
// serves at /, presses start, and contributes exact-precision MiniLM units next to a native
// worker. Every unit goes to two distinct workers and is accepted only when their output
// hashes agree, so a finished job proves the browser's bytes equal the native worker's; the
// job must also equal a local `tabula embed --precision exact`, and the browser's key must be
// credited with no strike. Then: the same with WebGPU switched off (the wasm CPU path), and a
// tab closed in the middle of a unit (the job still finishes, nothing lost).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { launch, readJsonl, root } from './harness.mjs';
import { Cluster, localExactEmbeddings, openVolunteer } from './cluster.mjs';

const artifacts = path.join(root, 'tests/artifacts');
fs.mkdirSync(artifacts, { recursive: true });
// 8 fixture texts: two units of four sequences.
const texts = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl')).slice(0, 8).map((f) => f.text);
const reference = localExactEmbeddings(texts);

async function embedAndCheck(cluster) {
  const r = await cluster.api('/v1/embeddings', { model: 'all-MiniLM-L6-v2', input: texts, precision: 'exact' });
  assert.equal(r.data.length, texts.length);
  r.data.forEach((d, i) => assert.deepEqual(d.embedding, reference[i], `text ${i} differs from the local exact run`));
}

async function creditOf(cluster, key) {
  const entry = await cluster.ledger(key);
  assert.ok(entry, `the browser's key ${key} is not in the ledger`);
  const w = entry.workers[0];
  return w;
}

test('a fresh browser contributes on WebGPU next to a native worker, bit for bit, and is credited', { timeout: 600_000 }, async () => {
  const cluster = await Cluster.start();
  const browser = await launch({ webgpu: true });
  try {
    cluster.addWorker('native');
    // SwiftShader is slower than the CPU, so `auto` would pick the CPU: ask for the GPU.
    const v = await openVolunteer(browser, `${cluster.url}/`, { backend: 'gpu' });
    assert.match(await v.page.textContent('#device'), /^GPU \(WebGPU: .*\), as chosen in the settings$/,
      'the page should name the WebGPU adapter and why it computes there');
    await embedAndCheck(cluster);
    // Both units went to both workers (two distinct workers per unit, two workers in all).
    const w = await creditOf(cluster, v.key);
    assert.equal(w.strikes, 0);
    assert.ok(w.units_verified >= 2, `browser verified units: ${w.units_verified}`);
    assert.ok(w.verified_credit > 0);
    // The page shows what it did once the receipts arrive.
    await v.page.waitForFunction(() => Number(document.getElementById('units').textContent) >= 2
      && Number(document.getElementById('verified').textContent) > 0, null, { timeout: 60_000 });
    await v.page.screenshot({ path: path.join(artifacts, 'volunteer-webgpu.png'), fullPage: true });
    assert.deepEqual(v.errors, []);
    // Linking a payout address from the settings: the ledger then finds the credit under it.
    const payout = '0x' + 'ab12'.repeat(10);
    await v.page.click('details summary');
    await v.page.fill('#payout', payout);
    await v.page.click('#payout-form button[type=submit]');
    let paid = null;
    for (let i = 0; i < 100 && !paid; i++) {
      paid = await cluster.ledger(payout);
      if (!paid) await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(paid, 'the payout address was not linked');
    assert.equal(paid.workers[0].worker, v.key);
    // An epoch settles it on-chain: the page offers the claim, and after it shows the balance.
    assert.match(cluster.postEpoch(), /epoch 1: root 0x/);
    await v.page.waitForSelector('#claim-row:not([hidden])', { timeout: 30_000 });
    await v.page.click('#claim');
    await v.page.waitForFunction(() => Number(document.getElementById('onchain').textContent) > 0, null, { timeout: 30_000 });
    const proof = await (await fetch(`${cluster.url}/v1/ledger/proof/${payout}`)).json();
    assert.equal(proof.on_chain.balance_micro, proof.cumulative_amount);
    assert.equal(await v.page.textContent('#onchain'), (Number(proof.cumulative_amount) / 1e6).toFixed(2));
    assert.ok(await v.page.isHidden('#claim-row'), 'nothing is left to claim');
    await v.page.screenshot({ path: path.join(artifacts, 'volunteer-claimed.png'), fullPage: true });
    // The requester page lists the job as done, with every unit verified.
    const requester = await v.context.newPage();
    await requester.goto(`${cluster.url}/requester.html`);
    await requester.fill('#key', cluster.apiKey);
    await requester.click('#key-form button');
    await requester.waitForSelector('#jobs tbody tr[data-status="done"]', { timeout: 30_000 });
    assert.match(await requester.textContent('#jobs tbody tr'), /2\/2/);
    await requester.screenshot({ path: path.join(artifacts, 'requester.png'), fullPage: true });
    // Stop releases nothing (idle) and the page says so.
    await v.page.click('#toggle');
    await v.page.waitForFunction(() => document.getElementById('phase').textContent.startsWith('Not running'));
  } finally {
    await browser.close();
    await cluster.stop();
  }
});

test('without WebGPU the page computes on the wasm CPU path and still agrees', { timeout: 600_000 }, async () => {
  const cluster = await Cluster.start();
  const browser = await launch({ webgpu: false });
  try {
    cluster.addWorker('native');
    const v = await openVolunteer(browser, `${cluster.url}/`);
    assert.match(await v.page.textContent('#device'), /^CPU \(wasm.*\): this browser has no WebGPU adapter$/);
    await embedAndCheck(cluster);
    const w = await creditOf(cluster, v.key);
    assert.equal(w.strikes, 0);
    assert.ok(w.units_verified >= 2);
    await v.page.screenshot({ path: path.join(artifacts, 'volunteer-cpu.png'), fullPage: true });
    assert.deepEqual(v.errors, []);
  } finally {
    await browser.close();
    await cluster.stop();
  }
});

test('a browser that will not store the weights (1 KiB of quota) computes from the download and is credited', { timeout: 600_000 }, async () => {
  const cluster = await Cluster.start();
  const browser = await launch({ webgpu: false });
  try {
    cluster.addWorker('native');
    const v = await openVolunteer(browser, `${cluster.url}/`, null, { quotaBytes: 1024 });
    await embedAndCheck(cluster);
    const w = await creditOf(cluster, v.key);
    assert.equal(w.strikes, 0);
    assert.ok(w.units_verified >= 2, JSON.stringify(w));
    // The refusal was real: nothing was kept.
    const kept = await v.page.evaluate(async () => (await caches.keys()).length
      ? (await Promise.all((await caches.keys()).map(async (n) => (await (await caches.open(n)).keys()).length))).reduce((a, b) => a + b, 0)
      : 0);
    assert.equal(kept, 0, 'the weights were stored despite a quota of 1 KiB');
    // Nor could the key be kept, and the page says what that means.
    assert.match(await v.page.textContent('#key-note'), /would not keep your key.*until this page closes/);
    assert.deepEqual(v.errors, []);
  } finally {
    await browser.close();
    await cluster.stop();
  }
});

test('on a software WebGPU adapter (SwiftShader) the page calibrates both devices and computes on the faster CPU, saying why', { timeout: 300_000 }, async () => {
  const cluster = await Cluster.start();
  const browser = await launch({ webgpu: true });
  try {
    const v = await openVolunteer(browser, `${cluster.url}/`);
    const device = await v.page.textContent('#device');
    // e.g. "CPU (wasm, relaxed SIMD): 7.5× the speed of this browser's GPU (WebGPU: …) in a test (21 ms against 158 ms)"
    assert.match(device, /^CPU \(wasm.*\): [\d.]+× the speed of this browser's GPU \(WebGPU: .*\) in a test \(\d+ ms against \d+ ms\)$/, device);
    console.log(`calibration: ${device}`);
    assert.match(await v.page.textContent('#credit-note'), /One credit is one GFLOP/);
    assert.deepEqual(v.errors, []);
  } finally {
    await browser.close();
    await cluster.stop();
  }
});

test('on the CPU the page computes units side by side in a pool of compute workers, one key and one session, as many as the throttle allows', { timeout: 600_000 }, async () => {
  // A fresh key holds one lease at a time during its probation (3 clean units): this one
  // may hold two from the start, so that the pool's side-by-side units show at once.
  const cluster = await Cluster.start({ extra: ['--probation-leases', '2'] });
  const browser = await launch({ webgpu: false });
  try {
    cluster.addWorker('native');
    const v = await openVolunteer(browser, `${cluster.url}/`);
    const cores = await v.page.evaluate(() => Math.min(16, navigator.hardwareConcurrency || 1));
    assert.ok(cores >= 2, `this test needs two CPU cores; the browser reports ${cores}`);
    await v.page.waitForFunction((n) => self.tabulaStatus && self.tabulaStatus.threads === n, cores, { timeout: 60_000 });
    // 32 texts: eight units, each computed by the browser and the native worker.
    const many = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl')).slice(0, 32).map((f) => f.text);
    const expected = localExactEmbeddings(many);
    const r = await cluster.api('/v1/embeddings', { model: 'all-MiniLM-L6-v2', input: many, precision: 'exact' });
    r.data.forEach((d, i) => assert.deepEqual(d.embedding, expected[i], `text ${i} differs from the local exact run`));
    const status = await v.page.evaluate(() => self.tabulaStatus);
    assert.ok(status.peakParallel >= 2, `the page never computed two units at once: ${JSON.stringify(status)}`);
    const w = await creditOf(cluster, v.key);
    assert.equal(w.strikes, 0, JSON.stringify(w));
    assert.ok(w.units_verified >= 2, JSON.stringify(w));
    // One session for the key, however many compute workers.
    const log = fs.readFileSync(path.join(cluster.dir, 'serve.log'), 'utf8').replace(/\x1b\[[0-9;]*m/g, '');
    assert.equal(log.split(`worker connected worker=${v.key}`).length - 1, 1, 'the browser logged in more than once');
    // Half the processor: half the compute workers (at least one).
    await v.page.click('details summary');
    await v.page.fill('#throttle', '50');
    await v.page.dispatchEvent('#throttle', 'input');
    await v.page.waitForFunction((n) => self.tabulaStatus.threads === n, Math.max(1, Math.floor(cores / 2)), { timeout: 30_000 });
    assert.deepEqual(v.errors, []);
  } finally {
    await browser.close();
    await cluster.stop();
  }
});

test('with "pause while hidden" on, hiding the tab stops the worker and showing it resumes', { timeout: 300_000 }, async () => {
  const cluster = await Cluster.start();
  const browser = await launch({ webgpu: false });
  try {
    const v = await openVolunteer(browser, `${cluster.url}/`);
    await v.page.waitForFunction(() => document.getElementById('phase').textContent.startsWith('Connected'), null, { timeout: 60_000 });
    await v.page.click('details summary');
    await v.page.check('#pause-hidden');
    // Headless tabs are always visible: the test plays the browser's part in hiding one.
    const setVisibility = (state) => v.page.evaluate((s) => {
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => s });
      document.dispatchEvent(new Event('visibilitychange'));
    }, state);
    await setVisibility('hidden');
    await v.page.waitForFunction(() => document.getElementById('phase').textContent.startsWith('Paused (tab hidden)'), null, { timeout: 30_000 });
    const workers = async () => (await (await fetch(`${cluster.url}/healthz`)).json()).workers_connected;
    for (let i = 0; i < 100 && await workers() !== 0; i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await workers(), 0, 'the paused tab should have closed its connection');
    await setVisibility('visible');
    await v.page.waitForFunction(() => document.getElementById('phase').textContent.startsWith('Connected'), null, { timeout: 60_000 });
    assert.equal(await workers(), 1);
    // The setting is remembered for the next visit.
    await v.page.reload();
    assert.equal(await v.page.isChecked('#pause-hidden'), true);
    assert.deepEqual(v.errors, []);
  } finally {
    await browser.close();
    await cluster.stop();
  }
});

test('closing the tab in the middle of a unit loses nothing', { timeout: 600_000 }, async () => {
  // Short leases, so the unit the closed tab held goes back to the pool quickly.
  const cluster = await Cluster.start({ leaseSecs: 5 });
  const browser = await launch({ webgpu: true });
  try {
    const v = await openVolunteer(browser, `${cluster.url}/`);
    await v.page.waitForFunction(() => document.getElementById('phase').textContent.startsWith('Connected'), null, { timeout: 60_000 });
    // Eight units, so that the tab (two at a time on two cores) is still at work when it closes.
    const many = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl')).slice(0, 32).map((f) => f.text);
    const expected = localExactEmbeddings(many);
    const job = cluster.api('/v1/embeddings', { model: 'all-MiniLM-L6-v2', input: many, precision: 'exact' }).then((r) => {
      r.data.forEach((d, i) => assert.deepEqual(d.embedding, expected[i], `text ${i} differs from the local exact run`));
    });
    // The browser is the only worker: it takes units at once. Close the tab while it computes.
    await v.page.waitForFunction(() => self.tabulaStatus && self.tabulaStatus.computing > 0, null, { timeout: 60_000, polling: 10 });
    await v.context.close();
    // Two native workers arrive and finish the job, including the abandoned unit.
    cluster.addWorker('native-a');
    cluster.addWorker('native-b');
    await job;
    // Leaving is not cheating: no strike for the volunteer. (Its abandoned lease either
    // expired, or was dropped when the natives verified the unit first: both are fine.)
    const w = await creditOf(cluster, v.key);
    assert.equal(w.strikes, 0, JSON.stringify(w));
  } finally {
    await browser.close();
    await cluster.stop();
  }
});
