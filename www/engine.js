// What the volunteer's session worker (worker.js) and its compute workers (compute.js) share:
// loading the wasm engine, and model files by hash from the Cache API or the coordinator.

// Two builds of the same engine: `pkg-relaxed` uses wasm relaxed SIMD for exact precision's
// int8 dot products (same bits, ~20 % faster); `pkg` runs everywhere. This probe module
// (i8x16.relaxed_swizzle) validates only where relaxed SIMD exists.
const RELAXED_SIMD_PROBE = new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0,
  10, 15, 1, 13, 0, 65, 1, 253, 15, 65, 2, 253, 15, 253, 128, 2, 11]);

export async function loadEngine() {
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

const WEIGHTS_CACHE = 'tabula-weights-v1';

// A model file by its SHA-256, from the Cache API or else the coordinator. The hash is checked
// in Rust before the file is used; a file that fails it is evicted (see `computeUnit`).
export async function weights(coordinator, file, report) {
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

export async function evict(coordinator, files) {
  const cache = await caches.open(WEIGHTS_CACHE).catch(() => null);
  if (!cache) return;
  for (const f of files) await cache.delete(new URL(`/v1/weights/${f.sha256}`, coordinator).href).catch(() => {});
}

