// The browser benchmark: our wasm build next to transformers.js (onnxruntime-web) in the same
// headless Chromium, on the same texts, one fresh browser profile per configuration:
//   - MiniLM embeddings/s, batch 32, short and 128-token texts: WebGPU (SwiftShader on a machine
//     without a GPU) and the CPU (our wasm SIMD path vs onnxruntime-web's wasm, 1 thread);
//   - the time from opening the volunteer page (cold profile) to its first finished unit;
//   - the gzipped size of what a browser downloads to run each engine.
// Usage (after `npm run build` at the top and `npm ci --ignore-scripts` here):
//   node bench/browser/bench.mjs [--texts FILE] [--onnx FILE] [--onnx-q8 FILE] [--quick] [--only ENGINES] [--cpu]
// --texts is the JSON `bench/peers.py --texts-out` writes (the native benchmark's texts);
// --onnx is MiniLM exported to ONNX (peers.py caches it as ~/.cache/tabula-bench/minilm_l6_fp32.onnx).
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const quick = process.argv.includes('--quick');
const modelsDir = process.env.TABULA_MODELS || path.join(os.homedir(), '.cache/tabula/models');
const textsFile = arg('--texts', path.join(os.homedir(), '.cache/tabula-bench/texts-seed0.json'));
const onnxFile = arg('--onnx', path.join(os.homedir(), '.cache/tabula-bench/minilm_l6_fp32.onnx'));
// transformers.js' q8 model is onnxruntime's dynamic int8 quantisation (bench/peers.py makes it).
const onnxQ8File = arg('--onnx-q8', path.join(os.homedir(), '.cache/tabula-bench/minilm_l6_int8_dynamic.onnx'));
for (const [what, file] of [['texts', textsFile], ['ONNX model', onnxFile], ['int8 ONNX model', onnxQ8File],
  ['wasm build', path.join(root, 'www/pkg/tabula_web_bg.wasm')], ['relaxed-SIMD wasm build', path.join(root, 'www/pkg-relaxed/tabula_web_bg.wasm')],
  ['transformers.js', path.join(here, 'node_modules/@huggingface/transformers/dist/transformers.js')]]) {
  if (!fs.existsSync(file)) {
    console.error(`${what} missing: ${file}\n(npm run build; npm ci --ignore-scripts --prefix bench/browser; bench/peers.py writes the texts and the ONNX file)`);
    process.exit(2);
  }
}
const exactFile = fs.readdirSync(modelsDir).find((f) => f.startsWith('all-MiniLM-L6-v2.exact.'));
const exact = { file: exactFile, sha256: exactFile.split('.exact.')[1].replace('.safetensors', '') };
const texts = JSON.parse(fs.readFileSync(textsFile, 'utf8'));

const types = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json' };
function route(url) {
  const tjsModel = path.join(modelsDir, 'all-MiniLM-L6-v2');
  if (url === '/' || url === '/page.html') return path.join(here, 'page.html');
  if (url === '/embed-worker.js' || url === '/tabula-load.js') return path.join(here, url.slice(1));
  if (url === '/texts.json') return { json: { short: texts.short, long: texts.long } };
  if (url === '/exact.json') return { json: exact };
  if (url.startsWith('/pkg/') || url.startsWith('/pkg-relaxed/')) return path.join(root, 'www', url);
  if (url.startsWith('/node_modules/')) return path.join(here, url);
  if (url.startsWith('/models/')) return path.join(modelsDir, url.slice('/models/'.length));
  // `tabula models fetch` keeps tokenizer.json only; transformers.js also reads this file
  // (sentence-transformers/all-MiniLM-L6-v2's own).
  if (url === '/tjs-models/all-MiniLM-L6-v2/tokenizer_config.json') {
    return { json: { tokenizer_class: 'BertTokenizer', do_lower_case: true, model_max_length: 512, clean_up_tokenization_spaces: true,
      cls_token: '[CLS]', sep_token: '[SEP]', pad_token: '[PAD]', mask_token: '[MASK]', unk_token: '[UNK]', tokenize_chinese_chars: true, strip_accents: null } };
  }
  if (url === '/tjs-models/all-MiniLM-L6-v2/onnx/model.onnx') return onnxFile;
  if (url === '/tjs-models/all-MiniLM-L6-v2/onnx/model_quantized.onnx') return onnxQ8File;
  if (url.startsWith('/tjs-models/all-MiniLM-L6-v2/')) return path.join(tjsModel, url.slice('/tjs-models/all-MiniLM-L6-v2/'.length));
  return null;
}
const server = http.createServer((req, res) => {
  const url = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  const target = url.includes('..') ? null : route(url);
  if (target && target.json) {
    res.writeHead(200, { 'content-type': 'application/json', 'cross-origin-embedder-policy': 'require-corp' }).end(JSON.stringify(target.json));
  } else if (target && fs.existsSync(target) && fs.statSync(target).isFile()) {
    // Cross-origin isolated, so that onnxruntime-web may use threads (SharedArrayBuffer).
    res.writeHead(200, { 'content-type': types[path.extname(target)] || 'application/octet-stream',
      'cross-origin-opener-policy': 'same-origin', 'cross-origin-embedder-policy': 'require-corp' });
    fs.createReadStream(target).pipe(res);
  } else {
    res.writeHead(404).end();
  }
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const base = `http://127.0.0.1:${server.address().port}`;

async function launch(webgpu) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tabula-bench-'));
  const args = ['--headless=new', '--no-sandbox', '--disable-gpu-sandbox', '--no-first-run', '--disable-sync',
    '--disable-background-networking', '--disable-component-update', '--disable-quic', '--remote-debugging-pipe',
    `--user-data-dir=${profile}`, '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1'];
  if (webgpu) args.push('--enable-unsafe-webgpu');
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', ignoreDefaultArgs: true, args, timeout: 60_000 });
  // The cold profile goes with the browser (the weights it cached are megabytes per run).
  const close = browser.close.bind(browser);
  browser.close = async () => {
    try { await close(); } finally { fs.rmSync(profile, { recursive: true, force: true, maxRetries: 5 }); }
  };
  return browser;
}

async function run(params) {
  const browser = await launch(params.device === 'gpu');
  try {
    const page = await browser.newPage();
    let done;
    const finished = new Promise((r) => { done = r; });
    page.on('console', (m) => {
      const t = m.text();
      if (/^(RESULT|ERROR)/.test(t)) done(t);
      else if (m.type() === 'error') process.stderr.write(`  page: ${t}\n`);
    });
    page.on('pageerror', (e) => done(`ERROR ${e.message}`));
    await page.goto(`${base}/page.html?${new URLSearchParams(params)}`);
    const line = await Promise.race([finished, new Promise((r) => setTimeout(() => r('ERROR timeout'), 1_800_000))]);
    if (!line.startsWith('RESULT ')) throw new Error(`${JSON.stringify(params)}: ${line}`);
    return JSON.parse(line.slice(7));
  } finally {
    await browser.close();
  }
}

// SwiftShader runs WebGPU on the CPU, ~40x slower than wasm for transformers.js: short texts
// only there, one warm-up and one timed batch (still minutes).
const reps = quick ? '1' : '3';
const configs = [
  { engine: 'tabula', device: 'cpu', pkg: 'pkg', tasks: 'short,long', reps },
  { engine: 'tabula-exact', device: 'cpu', pkg: 'pkg', tasks: 'short,long', reps },
  { engine: 'tabula-exact', device: 'cpu', pkg: 'pkg-relaxed', tasks: 'short,long', reps },
  { engine: 'tjs', device: 'cpu', dtype: 'fp32', tasks: 'short,long', reps },
  { engine: 'tjs', device: 'cpu', dtype: 'q8', tasks: 'short,long', reps },
  // Two threads each: our pool of workers (as the volunteer page runs it) against
  // onnxruntime-web's threads.
  { engine: 'tabula', device: 'cpu', pkg: 'pkg', tasks: 'short,long', reps, threads: '2' },
  { engine: 'tabula-exact', device: 'cpu', pkg: 'pkg-relaxed', tasks: 'short,long', reps, threads: '2' },
  { engine: 'tjs', device: 'cpu', dtype: 'fp32', tasks: 'short,long', reps, threads: '2' },
  { engine: 'tjs', device: 'cpu', dtype: 'q8', tasks: 'short,long', reps, threads: '2' },
  { engine: 'tabula', device: 'gpu', pkg: 'pkg', tasks: 'short', reps: '1' },
  { engine: 'tabula-exact', device: 'gpu', pkg: 'pkg', tasks: 'short', reps: '1' },
  { engine: 'tjs', device: 'gpu', dtype: 'fp32', tasks: 'short', reps: '1' },
];
// --only ENGINE[,ENGINE]: just those configurations (tabula, tabula-exact, tjs), no first unit.
const only = arg('--only', '') ? arg('--only', '').split(',') : null;
// --cpu: the CPU configurations only (SwiftShader's take minutes).
const cpuOnly = process.argv.includes('--cpu');
const results = [];
for (const c of configs.filter((c) => (!only || only.includes(c.engine)) && (!cpuOnly || c.device === 'cpu'))) {
  process.stderr.write(`running ${JSON.stringify(c)} ...\n`);
  const r = await run(c);
  process.stderr.write(`  ${JSON.stringify(r)}\n`);
  // The page reports the device it found; the configuration's `device` (cpu|gpu) stays the key.
  results.push({ ...r, deviceName: r.device, ...c });
}
server.close();

// Time to first unit: a cold profile opens the volunteer page served by a real coordinator
// (release binary) with an exact-precision job waiting, presses start, and the clock stops
// when the page counts its first submitted unit (wasm download and compile, key creation,
// 24 MB of weights, model load and the unit itself).
const targetDir = process.env.CARGO_TARGET_DIR || path.join(root, 'target');
process.env.TABULA_BIN ||= path.join(targetDir, 'release/tabula');
const { Cluster } = await import('../../tests/browser/cluster.mjs');
const firstUnit = {};
for (const device of only ? [] : ['gpu', 'cpu']) {
  const cluster = await Cluster.start();
  const browser = await launch(device === 'gpu');
  try {
    cluster.addWorker('native');
    const page = await browser.newPage();
    const t0 = Date.now();
    await page.goto(`${cluster.url}/`);
    const job = cluster.api('/v1/embeddings', { model: 'all-MiniLM-L6-v2', input: texts.short.slice(0, 8), precision: 'exact' });
    await page.click('#toggle');
    await page.waitForFunction(() => Number(document.getElementById('units').textContent) >= 1, null, { timeout: 600_000 });
    firstUnit[device] = Date.now() - t0;
    await job;
  } finally {
    await browser.close();
    await cluster.stop();
  }
}

// Each of ours next to the peer it is measured against: fast (f32) against transformers.js
// fp32, exact (int8) against transformers.js q8 where it ran (the CPU), fp32 otherwise.
const rows = [];
const label = (r) => r.engine === 'tjs' ? `transformers.js ${r.dtype}`
  : `tabula ${r.engine === 'tabula' ? 'fast (f32)' : 'exact (int8)'}${r.pkg === 'pkg-relaxed' ? ', relaxed SIMD' : ''}`;
for (const ours of results.filter((r) => r.engine !== 'tjs')) {
  const peers = results.filter((r) => r.engine === 'tjs' && r.device === ours.device && (r.threads || '1') === (ours.threads || '1'));
  const peer = (ours.engine === 'tabula-exact' && peers.find((r) => r.dtype === 'q8')) || peers.find((r) => r.dtype === 'fp32');
  if (!peer) continue;
  for (const task of ['short', 'long']) {
    if (!ours[task] || !peer[task]) continue;
    const a = ours[task].sentencesPerSec, b = peer[task].sentencesPerSec;
    const t = ours.threads || '1';
    rows.push(`| ${ours.device === 'gpu' ? 'WebGPU (SwiftShader)' : `CPU (wasm, ${t} thread${t === '1' ? '' : 's'})`} | minilm-${task}-b32 | ${label(ours)} | ${a} | ${label(peer)} | ${b} | ${(a / b).toFixed(2)}× |`);
  }
}
const gz = (files) => files.reduce((n, f) => n + zlib.gzipSync(fs.readFileSync(f), { level: 9 }).length, 0);
const ours = gz([path.join(root, 'www/pkg/tabula_web_bg.wasm'), path.join(root, 'www/pkg/tabula_web.js'), ...['worker.js', 'engine.js', 'compute.js'].map((f) => path.join(root, 'www', f))]);
const ort = path.join(here, 'node_modules/onnxruntime-web/dist');
const theirs = gz([path.join(ort, 'ort-wasm-simd-threaded.asyncify.wasm'), path.join(ort, 'ort-wasm-simd-threaded.asyncify.mjs'),
  path.join(here, 'node_modules/@huggingface/transformers/dist/transformers.js')]);

const probe = await launch(false);
console.log(`Chromium ${probe.version()}; ${os.cpus()[0].model}, ${os.cpus().length} logical CPUs`);
await probe.close();
console.log('| device | task | ours | sentences/s | peer | sentences/s | ours / peer |');
console.log('|---|---|---|---:|---|---:|---:|');
for (const r of rows) console.log(r);
console.log(`\nModel load (fresh profile, files from 127.0.0.1): ${results.map((r) => `${label(r)}/${r.device} ${r.loadMs} ms`).join(', ')}`);
console.log(`Engine download, gzipped: tabula ${(ours / 1e6).toFixed(2)} MB (wasm + glue + workers) vs transformers.js ${(theirs / 1e6).toFixed(2)} MB (onnxruntime-web wasm + glue + transformers.js); ratio ${(ours / theirs).toFixed(2)}×`);
console.log(`Volunteer page, cold profile, from opening the page to the first submitted unit: ${(firstUnit.gpu / 1000).toFixed(1)} s on WebGPU, ${(firstUnit.cpu / 1000).toFixed(1)} s without WebGPU`);
fs.writeFileSync(arg('--json-out', path.join(os.tmpdir(), 'tabula-browser-bench.json')), JSON.stringify(results, null, 1));
process.exit(0);
