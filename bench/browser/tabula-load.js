// Our engine and MiniLM (fast or exact) from the benchmark server, for the page (one thread)
// and for each of its Web Workers (embed-worker.js, threads > 1).
const bytes = async (path) => {
  const r = await fetch(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
};

export async function loadTabula(pkg, device, exact) {
  const { default: init, Embedder, ExactEmbedder } = await import(`/${pkg}/tabula_web.js`);
  await init();
  const dir = '/models/all-MiniLM-L6-v2';
  const tokenizer = await bytes(`${dir}/tokenizer.json`);
  if (exact) {
    const { file, sha256 } = await (await fetch('/exact.json')).json();
    return ExactEmbedder.load(await bytes(`/models/${file}`), sha256, tokenizer, device);
  }
  return Embedder.load(await bytes(`${dir}/config.json`), await bytes(`${dir}/model.safetensors`), tokenizer, device);
}
