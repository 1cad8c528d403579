// A real coordinator (`tabula serve`) with native workers on loopback, for the browser
// volunteer tests: the same binary the Rust cluster tests use, started as a process.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { removeDir, root } from './harness.mjs';

const targetDir = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
export const bin = process.env.TABULA_BIN || path.join(targetDir, 'debug', 'tabula');

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export class Cluster {
  static async start({ leaseSecs = 30, extra = [] } = {}) {
    if (!fs.existsSync(bin)) throw new Error(`${bin} is missing: build it with cargo build -p tabula-cli`);
    const c = new Cluster();
    c.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tabula-browser-cluster-'));
    c.port = await freePort();
    c.url = `http://127.0.0.1:${c.port}`;
    c.workers = [];
    c.logs = []; // the workers' log files, closed by `stop`
    c.log = fs.openSync(path.join(c.dir, 'serve.log'), 'a');
    c.serve = spawn(bin, ['serve', '--listen', `127.0.0.1:${c.port}`, '--local',
      '--data-dir', path.join(c.dir, 'data'), '--www', path.join(root, 'www'),
      '--lease-secs', String(leaseSecs), ...extra],
    // Info logs (sessions opened and closed, refereeing) are what a failed test's message quotes.
    { stdio: ['ignore', c.log, c.log], env: { ...process.env, TABULA_LOG: process.env.TABULA_LOG || 'info' } });
    for (let i = 0; ; i++) {
      try {
        const r = await fetch(`${c.url}/healthz`);
        if (r.ok) break;
      } catch { /* not up yet */ }
      if (i > 600) throw new Error(`the coordinator did not start; see ${c.dir}/serve.log`);
      await new Promise((r) => setTimeout(r, 100));
    }
    c.apiKey = execFileSync(bin, ['keys', 'create', '--data-dir', path.join(c.dir, 'data')], { encoding: 'utf8' }).trim();
    return c;
  }

  addWorker(name, extra = []) {
    const log = fs.openSync(path.join(this.dir, `${name}.log`), 'a');
    this.logs.push(log);
    const w = spawn(bin, ['worker', '--coordinator', this.url, '--state-dir', path.join(this.dir, name),
      '--backend', 'cpu', '--precision', 'exact', ...extra], { stdio: ['ignore', log, log] });
    this.workers.push(w);
    return w;
  }

  // A requester call. It gives up after `timeoutMs` (below undici's own 300 s, which would
  // only say "fetch failed"), and a failure quotes the coordinator's and workers' logs.
  async api(pathname, body, { timeoutMs = 240_000 } = {}) {
    let r, json;
    try {
      r = await fetch(`${this.url}${pathname}`, {
        method: body ? 'POST' : 'GET',
        headers: { authorization: `Bearer ${this.apiKey}`, 'content-type': 'application/json' },
        body: body ? JSON.stringify(body) : undefined,
        signal: AbortSignal.timeout(timeoutMs),
      });
      json = await r.json();
    } catch (e) {
      throw new Error(`${pathname}: ${e.message}${e.cause ? ` (${e.cause.message || e.cause})` : ''}\n${this.diagnostics()}`);
    }
    if (!r.ok) throw new Error(`${pathname}: HTTP ${r.status} ${JSON.stringify(json)}\n${this.diagnostics()}`);
    return json;
  }

  // The last lines of every log of this cluster, for a failed test's message.
  diagnostics(lines = 30) {
    return fs.readdirSync(this.dir).filter((f) => f.endsWith('.log')).map((f) => {
      // Strip the ANSI colours of tracing's output so the message stays readable.
      const text = fs.readFileSync(path.join(this.dir, f), 'utf8').replace(/\x1b\[[0-9;]*m/g, '');
      return `--- ${f} (last ${lines} lines)\n${text.split('\n').slice(-lines - 1).join('\n')}`;
    }).join('\n');
  }

  async ledger(key) {
    const r = await fetch(`${this.url}/v1/ledger/${key}`);
    return r.ok ? r.json() : null;
  }

  // `tabula chain post-epoch` on this coordinator's data: settles the linked credit on its
  // embedded chain.
  postEpoch() {
    // Credit settles at once here: the audit window (30 minutes by default) is tested in Rust.
    return execFileSync(bin, ['chain', 'post-epoch', '--data-dir', path.join(this.dir, 'data'),
      '--audit-window-minutes', '0'], { encoding: 'utf8' });
  }

  async stop() {
    for (const w of this.workers) w.kill('SIGINT');
    this.serve.kill('SIGINT');
    await new Promise((r) => setTimeout(r, 300));
    for (const p of [...this.workers, this.serve]) if (p.exitCode === null) p.kill('SIGKILL');
    await Promise.all([...this.workers, this.serve].map((p) => (p.exitCode !== null || p.signalCode !== null
      ? null : new Promise((r) => { p.once('exit', r); setTimeout(r, 5000); }))));
    // A failed test has quoted the logs already (`diagnostics`); the weights copies inside
    // are hundreds of megabytes per cluster.
    for (const fd of [this.log, ...this.logs]) fs.closeSync(fd);
    removeDir(this.dir);
  }
}

// The volunteer page at `url` in a fresh browser context (its own key), with `settings` as
// the page keeps them in localStorage, started; resolves once its key is known.
// `quotaBytes` overrides the origin's storage quota (DevTools' Storage.overrideQuotaForOrigin),
// as a browser short of disk space would have it.
export async function openVolunteer(browser, url, settings = null, { quotaBytes } = {}) {
  const context = await browser.newContext();
  if (settings) await context.addInitScript((s) => localStorage.setItem('tabula-settings', s), JSON.stringify(settings));
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(url);
  if (quotaBytes !== undefined) {
    const cdp = await context.newCDPSession(page);
    await cdp.send('Storage.overrideQuotaForOrigin', { origin: new URL(url).origin, quotaSize: quotaBytes });
  }
  await page.click('#toggle');
  // The key appears once the engine is loaded and the key is read from IndexedDB.
  await page.waitForFunction(() => /^[0-9a-f]{64}$/.test(document.getElementById('key').textContent), null, { timeout: 120_000 });
  return { context, page, key: await page.textContent('#key'), errors };
}

// The local reference for a completion: `tabula generate --precision exact`, greedy.
export function localGeneration(prompt, maxTokens) {
  const out = execFileSync(bin, ['generate', '--model', 'SmolLM2-135M-Instruct', '--precision', 'exact', '--json',
    '--prompt', prompt, '--max-tokens', String(maxTokens), '--temperature', '0', '--seed', '0'], { encoding: 'utf8' });
  return JSON.parse(out.trim()).text;
}

// The local reference: `tabula embed --precision exact` on the same texts, one vector per text.
export function localExactEmbeddings(texts) {
  const out = execFileSync(bin, ['embed', '--model', 'all-MiniLM-L6-v2', '--precision', 'exact', '--backend', 'cpu'],
    { input: texts.join('\n') + '\n', encoding: 'utf8', maxBuffer: 64 << 20 });
  return out.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l).embedding);
}
