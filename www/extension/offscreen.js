// The offscreen document: hosts the same Web Worker as the volunteer page (worker.js and the
// wasm package, copied here by `npm run build`) and relays messages between it and the
// extension, and hosts the peer connections of pipeline stages (www/peers.js).
import { hostPeers } from './peers.js';

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
hostPeers(worker); // pipeline stages' peer connections (workers cannot open them)

worker.onmessage = (m) => {
  if (m.data.type !== 'status') return;
  chrome.runtime.sendMessage({ target: 'background', type: 'status', status: m.data });
};
worker.onerror = (e) => {
  chrome.runtime.sendMessage({
    target: 'background', type: 'status',
    status: { type: 'status', phase: 'error', message: `the compute engine stopped (${e.message})` },
  });
};

chrome.runtime.onMessage.addListener((msg) => {
  if (msg.target !== 'offscreen') return false;
  const { target, ...command } = msg;
  worker.postMessage(command);
  return false;
});
