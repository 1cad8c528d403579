// MiniLM in headless Chromium, from the wasm build: on WebGPU (SwiftShader) and on the wasm CPU
// path, checked against the reference fixture (identical token ids, cosine >= 0.9999); and BERT
// directories added with `tabula models add`, against transformers the same way.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { serve, launch, readJsonl, cosine, root, addRandomModels } from './harness.mjs';
import { bin } from './cluster.mjs';

const fixtures = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl'));
let server, browser, base;
// Models of the user's own (`tabula models add`), made at test time: served at /added/.
const added = fs.mkdtempSync(path.join(os.tmpdir(), 'tabula-added-'));

before(async () => {
  assert.ok(fs.existsSync(path.join(root, 'www/pkg/tabula_web.js')), 'www/pkg is missing: run `npm run build:wasm` first');
  server = await serve({ '/added/': path.join(added, 'models') });
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.close();
  fs.rmSync(added, { recursive: true, force: true });
});

async function embedInPage(backend, items, dir) {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/embed.html`);
  await page.waitForFunction(() => window.testReady === true, null, { timeout: 30_000 });
  const result = await page.evaluate(([b, texts, d]) => window.runEmbed(b, texts, d ?? undefined),
    [backend, items.map((f) => f.text), dir ?? null]);
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

// BERT directories of the user's own, added with `tabula models add` (random weights made now:
// CLS pooling with normalisation; max pooling of F16 weights without token types), in fast
// precision from their registered files: transformers' vectors (tests/fixtures/bert-random.json).
test('BERT models added with `tabula models add` (CLS and max pooling) on wasm and WebGPU match transformers', { timeout: 600_000 }, async () => {
  const { files } = addRandomModels(bin, added);
  const reference = JSON.parse(fs.readFileSync(path.join(root, 'tests/fixtures/bert-random.json')));
  for (const variant of ['bert-cls', 'bert-max']) {
    const folder = path.dirname(files(`my-${variant}`)[0]);
    const r = reference[variant];
    const items = r.texts.map((text, i) => ({ text, input_ids: r.ids[i], embedding: r.embeddings[i] }));
    for (const backend of ['cpu', 'gpu']) {
      const result = await embedInPage(backend, items, `/added/${folder}`);
      const worst = check(result, items);
      console.log(`${variant} ${backend}: device=${result.device} worst cosine=${worst}`);
    }
  }
});
