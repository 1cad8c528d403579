// Shared pieces of the browser tests: a static server for the page, the wasm package, the
// model files and the fixtures; and a headless Chromium with WebGPU (SwiftShader) enabled.
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const modelsDir = process.env.TABULA_MODELS || path.join(os.homedir(), '.cache/tabula/models');

const types = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json' };

// Routes: /pkg/* and /pkg-relaxed/* -> www/, /models/* -> the models directory, anything else -> tests/browser.
// `mounts` serves more folders: { '/prefix/': '/a/folder' }.
export function serve(mounts = {}) {
  const server = http.createServer((req, res) => {
    const url = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    let file;
    const mount = Object.keys(mounts).find((prefix) => url.startsWith(prefix));
    if (mount) file = path.join(mounts[mount], url.slice(mount.length));
    else if (url.startsWith('/pkg/') || url.startsWith('/pkg-relaxed/')) file = path.join(root, 'www', url);
    else if (url.startsWith('/models/')) file = path.join(modelsDir, url.slice('/models/'.length));
    else file = path.join(root, 'tests/browser', url);
    if (file.includes('..') || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      res.writeHead(404).end(`not found: ${url}`);
      return;
    }
    res.writeHead(200, { 'content-type': types[path.extname(file)] || 'application/octet-stream' });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

export async function launch({ webgpu = true } = {}) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tabula-chromium-'));
  const args = [
    '--headless=new', '--no-sandbox', '--disable-gpu-sandbox', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
    `--user-data-dir=${profile}`, '--remote-debugging-pipe',
  ];
  if (webgpu) args.push('--enable-unsafe-webgpu', '--enable-webgpu-developer-features');
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    ignoreDefaultArgs: true,
    args,
    timeout: 60_000,
  });
  // The profile goes with the browser: a test run leaves no gigabytes behind in the temp dir
  // (a full disk makes Chromium's Cache API fail, which once looked like a broken worker).
  const close = browser.close.bind(browser);
  browser.close = async (...a) => {
    try { await close(...a); } finally { removeDir(profile); }
  };
  return browser;
}

// A test's temp dir, removed unless TABULA_KEEP_TEST_DIRS is set (to read its logs afterwards).
export function removeDir(dir) {
  if (process.env.TABULA_KEEP_TEST_DIRS) return;
  try {
    fs.rmSync(dir, { recursive: true, force: true, maxRetries: 5 });
  } catch (e) {
    console.warn(`could not remove ${dir}: ${e.message}`);
  }
}

export function readJsonl(file) {
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
}

export function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb);
}

// Models of the user's own, made at test time with random weights (tests/fixtures/
// make_bert_dirs.py and make_llama_family.py, numpy and gguf from $TABULA_PYLIB) and added with
// `<bin> models add` to `<work>/models` as `my-bert-cls`, `my-bert-max` and `my-qwen`. Returns
// the models directory and, per name, its registered files (relative to it) and its exact file
// (quantised by `quantise`, a command that loads the model in exact precision).
export function addRandomModels(bin, work) {
  const made = path.join(work, 'made');
  const dir = path.join(work, 'models');
  const env = { ...process.env, PYTHONPATH: process.env.TABULA_PYLIB || '' };
  for (const script of ['make_bert_dirs.py', 'make_llama_family.py']) {
    execFileSync('python3', [path.join(root, 'tests/fixtures', script), '--out', made], { env, stdio: 'ignore' });
  }
  const models = { 'my-bert-cls': 'bert-cls', 'my-bert-max': 'bert-max', 'my-qwen': 'qwen2-gqa4.gguf' };
  for (const [name, source] of Object.entries(models)) {
    execFileSync(bin, ['models', 'add', path.join(made, source), '--name', name, '--dir', dir]);
  }
  const registry = JSON.parse(fs.readFileSync(path.join(dir, 'added/models.json')));
  const files = (name) => {
    const entry = registry.find((m) => m.name === name);
    return [entry.file, ...entry.others.map(([f]) => f)];
  };
  const exact = (name) => {
    const file = fs.readdirSync(path.join(dir, 'added')).find((f) => f.startsWith(`${name}.exact.`));
    assert.ok(file, `no exact file of ${name}: load it in exact precision first`);
    return { file: `added/${file}`, sha256: file.split('.exact.')[1].replace('.safetensors', '') };
  };
  return { dir, files, exact };
}
