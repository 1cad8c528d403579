// One of the benchmark page's compute workers (threads > 1): our engine in a Web Worker, as
// the volunteer page's pool runs it (www/compute.js), one model copy per worker.
// In: {type: 'load', pkg, device, exact} then {type: 'embed', id, texts}; out: {id} (with `device` after a load) or {id, error}.
import { loadTabula } from './tabula-load.js';

let model = null;

async function load({ pkg, device, exact }) {
  model = await loadTabula(pkg, device, exact);
  return model.device;
}

onmessage = async (m) => {
  const msg = m.data;
  try {
    if (msg.type === 'load') postMessage({ id: 'load', device: await load(msg) });
    else if (msg.type === 'embed') {
      await model.embed(msg.texts);
      postMessage({ id: msg.id });
    }
  } catch (e) {
    postMessage({ id: msg.id || 'load', error: String(e && e.stack || e) });
  }
};
