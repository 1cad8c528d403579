// The MV3 extension, loaded unpacked with --load-extension into a fresh profile: its popup
// starts the same worker in an offscreen document, which contributes exact-precision units next
// to a native worker; the job equals the local reference and the extension's key is credited.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { readJsonl, removeDir, root } from './harness.mjs';
import { Cluster, localExactEmbeddings } from './cluster.mjs';

const extensionDir = path.join(root, 'www/extension');
const artifacts = path.join(root, 'tests/artifacts');
fs.mkdirSync(artifacts, { recursive: true });
const texts = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl')).slice(8, 16).map((f) => f.text);

test('the extension completes units from its offscreen document and is credited', { timeout: 600_000 }, async () => {
  assert.ok(fs.existsSync(path.join(extensionDir, 'pkg/tabula_web.js')), 'www/extension/pkg is missing: run `npm run build`');
  const reference = localExactEmbeddings(texts);
  const cluster = await Cluster.start();
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tabula-extension-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: false, // the args below choose the new headless mode, which runs extensions
    ignoreDefaultArgs: true,
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu-sandbox', '--no-first-run', '--disable-sync',
      '--disable-background-networking', '--disable-component-update', '--remote-debugging-pipe',
      '--enable-unsafe-webgpu', `--disable-extensions-except=${extensionDir}`, `--load-extension=${extensionDir}`,
    ],
    timeout: 60_000,
  });
  try {
    cluster.addWorker('native');
    const sw = context.serviceWorkers()[0] || await context.waitForEvent('serviceworker', { timeout: 30_000 });
    const id = new URL(sw.url()).host;
    const popup = await context.newPage();
    await popup.goto(`chrome-extension://${id}/popup.html`);
    await popup.fill('#coordinator', cluster.url);
    await popup.click('#toggle');
    await popup.waitForFunction(() => /^[0-9a-f]{64}$/.test(document.getElementById('key').textContent), null, { timeout: 120_000 });
    const key = await popup.textContent('#key');
    const r = await cluster.api('/v1/embeddings', { model: 'all-MiniLM-L6-v2', input: texts, precision: 'exact' })
      .catch(async (e) => {
        // What the volunteer saw is half of the story when a job does not finish.
        const seen = await popup.evaluate(() => ['phase', 'device', 'units', 'verified']
          .map((id) => `${id}: ${document.getElementById(id).textContent}`).join('; ')).catch(() => 'popup gone');
        throw new Error(`${e.message}\n--- popup: ${seen}`);
      });
    r.data.forEach((d, i) => assert.deepEqual(d.embedding, reference[i], `text ${i} differs from the local exact run`));
    const entry = await cluster.ledger(key);
    assert.ok(entry, `the extension's key ${key} is not in the ledger`);
    assert.equal(entry.workers[0].strikes, 0);
    if (entry.workers[0].units_verified < 2) {
      // The native worker finished the job alone: what the extension saw says why.
      const seen = await popup.evaluate(() => ['phase', 'device', 'units']
        .map((id) => `${id}: ${document.getElementById(id).textContent}`).join('; ')).catch(() => 'popup gone');
      assert.fail(`the extension verified ${entry.workers[0].units_verified} units: ${JSON.stringify(entry.workers[0])}\n--- popup: ${seen}\n${cluster.diagnostics()}`);
    }
    await popup.waitForFunction(() => Number(document.getElementById('units').textContent) >= 2, null, { timeout: 60_000 });
    await popup.screenshot({ path: path.join(artifacts, 'extension-popup.png') });
    await popup.click('#toggle');
    await popup.waitForFunction(() => document.getElementById('phase').textContent.startsWith('Not running'), null, { timeout: 30_000 });
  } finally {
    await context.close();
    await cluster.stop();
    removeDir(profile);
  }
});
