// Exact precision in headless Chromium: WebGPU (SwiftShader) and the wasm CPU path must give
// the same bytes as the native CLI (CPU backend) for every input: MiniLM's integer embeddings
// by SHA-256 (and those of random BERT directories added with `tabula models add`), SmolLM2's
// and Gemma 3's chosen tokens and the SHA-256 of every step's integer logits.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { execFileSync } from 'node:child_process';
import { serve, launch, readJsonl, root, modelsDir, addRandomModels } from './harness.mjs';

const minilm = readJsonl(path.join(root, 'tests/fixtures/minilm.jsonl'));
const smol = readJsonl(path.join(root, 'tests/fixtures/smollm2.jsonl'));
const gemma = readJsonl(path.join(root, 'tests/fixtures/gemma3.jsonl'));
const targetDir = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
const tabula = process.env.TABULA_BIN || path.join(targetDir, 'debug/tabula');
// Decoding steps per prompt in the browser (SwiftShader is slow; every step is still hashed).
const STEPS = 3;
let server, browser, base;
// Models of the user's own (`tabula models add`), made at test time: their models directory
// is served at /added/.
const added = fs.mkdtempSync(path.join(os.tmpdir(), 'tabula-added-'));

function quantisedFile(model) {
  const files = fs.readdirSync(modelsDir).filter((f) => f.startsWith(`${model}.exact.`));
  assert.equal(files.length, 1, `one quantised file of ${model} in ${modelsDir} (run \`tabula models quantize\`)`);
  return { file: files[0], sha256: files[0].split('.exact.')[1].replace('.safetensors', '') };
}

function nativeEmbeddings() {
  const out = execFileSync(tabula, ['embed', '--precision', 'exact'], {
    input: minilm.map((f) => f.text).join('\n'),
    maxBuffer: 1 << 28,
  });
  return out.toString().trim().split('\n').map((l) => JSON.parse(l));
}

function nativeGeneration(f) {
  const args = ['generate', '--precision', 'exact', '--prompt', f.prompt, '--max-tokens', String(STEPS), '--json'];
  if (f.chat) args.push('--chat');
  const out = JSON.parse(execFileSync(tabula, args).toString());
  assert.deepEqual(out.prompt_ids, f.prompt_ids);
  return out;
}

before(async () => {
  for (const pkg of ['pkg', 'pkg-relaxed']) {
    assert.ok(fs.existsSync(path.join(root, `www/${pkg}/tabula_web.js`)), `www/${pkg} is missing: run \`npm run build:wasm\` first`);
  }
  assert.ok(fs.existsSync(tabula), `native tabula binary missing at ${tabula} (set TABULA_BIN)`);
  server = await serve({ '/added/': path.join(added, 'models') });
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.close();
  fs.rmSync(added, { recursive: true, force: true });
});

async function inPage(fn, args, pkg = 'pkg') {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${base}/exact.html?pkg=${pkg}`);
  await page.waitForFunction(() => window.testReady === true, null, { timeout: 30_000 });
  const result = await page.evaluate(([name, a]) => window[name](...a), [fn, args]);
  await page.close();
  assert.deepEqual(errors, []);
  return result;
}

for (const pkg of ['pkg', 'pkg-relaxed']) {
  test(`every int8 matrix kernel of the ${pkg} build gives the scalar kernel's bits`, { timeout: 300_000 }, async () => {
    const result = await inPage('runKernelCheck', [], pkg);
    assert.ok(result.kernels.includes('scalar'), JSON.stringify(result));
    if (pkg === 'pkg-relaxed') assert.ok(result.kernels.includes('wasm-relaxed-simd'), JSON.stringify(result));
    assert.deepEqual(result.diffs, [], `kernels ${result.kernels.join(', ')}`);
  });
}

const native = {};

for (const portable of [false, true]) {
  test(`every exact op on WebGPU matches the wasm CPU bit for bit (${portable ? 'portable int8 dot' : 'dot4I8Packed'})`, { timeout: 600_000 }, async () => {
    const result = await inPage('runSelfCheck', [portable]);
    assert.deepEqual(result.diffs, [], `packed_dot=${result.packed_dot}`);
  });
}

for (const backend of ['cpu', 'gpu']) {
  test(`MiniLM exact on ${backend === 'gpu' ? 'WebGPU (SwiftShader)' : 'the wasm CPU path'}: every fixture text hashes as natively`, { timeout: 1_800_000 }, async () => {
    native.embeddings ??= nativeEmbeddings();
    const { file, sha256 } = quantisedFile('all-MiniLM-L6-v2');
    const result = await inPage('runExactEmbed', [backend, file, sha256, minilm.map((f) => f.text)]);
    assert.equal(result.out.length, minilm.length);
    result.out.forEach((e, i) => {
      assert.deepEqual(e.input_ids, minilm[i].input_ids);
      assert.equal(e.sha256, native.embeddings[i].sha256, `text ${i} ${JSON.stringify(minilm[i].text)} on ${result.device}`);
      assert.deepEqual(e.q15, native.embeddings[i].embedding_q15);
    });
    console.log(`exact MiniLM ${backend}: device=${result.device} texts=${minilm.length} ms=${result.ms.toFixed(0)}`);
  });

  test(`SmolLM2 exact on ${backend === 'gpu' ? 'WebGPU (SwiftShader)' : 'the wasm CPU path'}: tokens and logits hashes as natively`, { timeout: 1_800_000 }, async () => {
    native.generation ??= smol.map(nativeGeneration);
    const { file, sha256 } = quantisedFile('SmolLM2-135M-Instruct');
    const result = await inPage('runExactDecode', [backend, file, sha256, smol.map((f) => f.prompt_ids), STEPS]);
    result.out.forEach((g, i) => {
      assert.deepEqual(g.ids, native.generation[i].ids, `tokens for ${JSON.stringify(smol[i].prompt)}`);
      assert.deepEqual(g.logits_sha256, native.generation[i].logits_sha256, `logits for ${JSON.stringify(smol[i].prompt)}`);
    });
    console.log(`exact SmolLM2 ${backend}: device=${result.device} prompts=${smol.length} steps=${STEPS} ms=${result.ms.toFixed(0)}`);
  });
}

test('MiniLM exact on the wasm CPU path with relaxed SIMD: every fixture text hashes as natively', { timeout: 1_800_000 }, async () => {
  native.embeddings ??= nativeEmbeddings();
  const { file, sha256 } = quantisedFile('all-MiniLM-L6-v2');
  const result = await inPage('runExactEmbed', ['cpu', file, sha256, minilm.map((f) => f.text)], 'pkg-relaxed');
  assert.equal(result.relaxed, true, 'the pkg-relaxed build uses relaxed SIMD');
  result.out.forEach((e, i) => {
    assert.equal(e.sha256, native.embeddings[i].sha256, `text ${i} ${JSON.stringify(minilm[i].text)} with relaxed SIMD`);
  });
  console.log(`exact MiniLM cpu relaxed-simd: texts=${minilm.length} ms=${result.ms.toFixed(0)}`);
});

test('SmolLM2 exact sampling (temperature 0.8, seed 3) gives the native tokens on wasm and WebGPU', { timeout: 900_000 }, async () => {
  const f = smol.find((x) => !x.chat);
  const args = ['generate', '--precision', 'exact', '--prompt', f.prompt, '--max-tokens', '4',
    '--temperature', '0.8', '--seed', '3', '--json'];
  const want = JSON.parse(execFileSync(tabula, args).toString());
  assert.equal(want.finish_reason, 'length');
  const { file, sha256 } = quantisedFile('SmolLM2-135M-Instruct');
  const sampling = { temperature: 0.8, topP: 1, seed: 3 };
  for (const backend of ['cpu', 'gpu']) {
    const result = await inPage('runExactDecode', [backend, file, sha256, [want.prompt_ids], 4, sampling]);
    assert.deepEqual(result.out[0].ids, want.ids, `sampled tokens on ${result.device}`);
    assert.deepEqual(result.out[0].logits_sha256, want.logits_sha256, `logits on ${result.device}`);
  }
});

// Gemma 3: heads of 256, sliding-window layers, GeGLU, and a 168 MB int8 vocabulary table that
// WebGPU's storage bindings (128 MiB on SwiftShader) hold in row blocks.
test('Gemma 3 exact on the wasm CPU path and WebGPU (SwiftShader): tokens and logits hashes as natively', { timeout: 1_800_000 }, async () => {
  const f = gemma[0];
  const args = ['generate', '--model', 'gemma-3-270m', '--precision', 'exact', '--prompt', f.prompt,
    '--max-tokens', String(STEPS), '--json'];
  const want = JSON.parse(execFileSync(tabula, args).toString());
  assert.deepEqual(want.prompt_ids, f.prompt_ids);
  const { file, sha256 } = quantisedFile('gemma-3-270m');
  for (const backend of ['cpu', 'gpu']) {
    const result = await inPage('runExactDecode', [backend, file, sha256, [f.prompt_ids], STEPS]);
    assert.deepEqual(result.out[0].ids, want.ids, `Gemma tokens on ${result.device}`);
    assert.deepEqual(result.out[0].logits_sha256, want.logits_sha256, `Gemma logits on ${result.device}`);
    console.log(`exact Gemma 3 ${backend}: device=${result.device} steps=${STEPS} ms=${result.ms.toFixed(0)}`);
  }
});

// Models of the user's own, added with `tabula models add` (random weights made now): BERT
// directories with CLS pooling and normalisation, and with max pooling of F16 weights without
// token types nor normalisation, and a Qwen2 GGUF (biases, 4 query heads on 1 KV head, K-quants).
// The browser computes what the native CLI does, bit for bit.
test('models added with `tabula models add` (two BERTs, a Qwen2 GGUF) exact on wasm and WebGPU: hashes as natively', { timeout: 900_000 }, async () => {
  const { dir, files, exact } = addRandomModels(tabula, added);
  const reference = JSON.parse(fs.readFileSync(path.join(root, 'tests/fixtures/bert-random.json')));
  for (const variant of ['bert-cls', 'bert-max']) {
    const name = `my-${variant}`;
    const texts = reference[variant].texts;
    const want = execFileSync(tabula, ['embed', '--model', name, '--models-dir', dir, '--precision', 'exact'], {
      input: texts.join('\n'),
      stdio: ['pipe', 'pipe', 'ignore'],
    }).toString().trim().split('\n').map((l) => JSON.parse(l));
    const { file, sha256 } = exact(name);
    const tokenizer = files(name).find((f) => f.endsWith('tokenizer.json'));
    for (const backend of ['cpu', 'gpu']) {
      const result = await inPage('runExactEmbed', [backend, `/added/${file}`, sha256, texts, `/added/${tokenizer}`]);
      assert.equal(result.out.length, texts.length);
      result.out.forEach((e, i) => {
        assert.deepEqual(e.input_ids, reference[variant].ids[i], `${variant} text ${i} tokens`);
        assert.equal(e.sha256, want[i].sha256, `${variant} text ${i} on ${result.device}`);
      });
      console.log(`exact ${variant} ${backend}: device=${result.device} texts=${texts.length} ms=${result.ms.toFixed(0)}`);
    }
  }
  const want = JSON.parse(execFileSync(tabula, ['generate', '--model', 'my-qwen', '--models-dir', dir, '--precision', 'exact',
    '--prompt', 'abcabc', '--max-tokens', '6', '--json'], { stdio: ['ignore', 'pipe', 'ignore'] }).toString());
  const { file, sha256 } = exact('my-qwen');
  for (const backend of ['cpu', 'gpu']) {
    const result = await inPage('runExactDecode', [backend, `/added/${file}`, sha256, [want.prompt_ids], 6]);
    assert.deepEqual(result.out[0].ids, want.ids, `Qwen2 tokens on ${result.device}`);
    assert.deepEqual(result.out[0].logits_sha256, want.logits_sha256, `Qwen2 logits on ${result.device}`);
  }
});
