// MiniLM in headless Chromium, from the wasm build: on WebGPU (SwiftShader) and on the wasm CPU
// path, checked against the reference fixture (identical token ids, cosine >= 0.9999).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { serve, launch, readJsonl, cosine, root } from './harness.mjs';

const fixtures = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl'));
let server, browser, base;

before(async () => {
  assert.ok(fs.existsSync(path.join(root, 'www/pkg/tabula_web.js')), 'www/pkg is missing: run `npm run build:wasm` first');
  server = await serve();
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.close();
});

async function embedInPage(backend, items) {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/embed.html`);
  await page.waitForFunction(() => window.testReady === true, null, { timeout: 30_000 });
  const result = await page.evaluate(([b, texts]) => window.runEmbed(b, texts), [backend, items.map((f) => f.text)]);
  await page.close();
  assert.deepEqual(errors, []);
  return result;
}

function check(result, items) {
  assert.equal(result.out.length, items.length);
  let worst = 1;
  items.forEach((f, i) => {
    assert.deepEqual(result.out[i].input_ids, f.input_ids, `token ids of ${JSON.stringify(f.text)}`);
    const c = cosine(result.out[i].embedding, f.embedding);
    worst = Math.min(worst, c);
    assert.ok(c >= 0.9999, `cosine ${c} for ${JSON.stringify(f.text)} on ${result.device}`);
  });
  return worst;
}

test('MiniLM on WebGPU (SwiftShader) matches the reference', { timeout: 900_000 }, async () => {
  const result = await embedInPage('gpu', fixtures);
  const worst = check(result, fixtures);
  console.log(`webgpu: device=${result.device} fallback=${result.fallbackAdapter} texts=${fixtures.length} ms=${result.ms.toFixed(0)} worst cosine=${worst}`);
});

test('MiniLM on the wasm CPU path matches the reference', { timeout: 300_000 }, async () => {
  const result = await embedInPage('cpu', fixtures);
  const worst = check(result, fixtures);
  console.log(`wasm cpu: texts=${fixtures.length} ms=${result.ms.toFixed(0)} worst cosine=${worst}`);
});
