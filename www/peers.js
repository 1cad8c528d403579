// Peer connections for pipeline stages, hosted by the document (the volunteer page or the
// extension's offscreen document) for the volunteer's Web Worker: browsers offer
// RTCPeerConnection to documents only. The connection itself is tabula-web's `PeerConnection`
// (Rust, web-sys); this file only carries messages. The data channel is handed to the worker
// the moment it exists (a transfer), so activations never pass through the document.
//
// Worker -> document: {type: 'peer-open', id, offerer}  {type: 'peer-signal', id, signal, text}
//                     {type: 'peer-close', session}
// Document -> worker: {type: 'peer-signal-out', id, signal, text}  {type: 'peer-channel', id, channel}
// `id` is `${session}/${peer}` (hex).

export function hostPeers(worker) {
  let engine = null; // the wasm package, loaded on the first stage
  const peers = new Map();
  const load = () => {
    engine ??= import('./pkg/tabula_web.js').then(async (pkg) => { await pkg.default(); return pkg; });
    return engine;
  };
  worker.addEventListener('message', (m) => {
    const msg = m.data || {};
    if (msg.type === 'peer-open') {
      if (peers.has(msg.id)) return;
      const entry = { pc: null };
      // Signals are applied in the order they came, after the connection exists.
      entry.chain = load().then(({ PeerConnection }) => {
        entry.pc = PeerConnection.create(msg.offerer,
          (signal, text) => worker.postMessage({ type: 'peer-signal-out', id: msg.id, signal, text }),
          (channel) => worker.postMessage({ type: 'peer-channel', id: msg.id, channel }, [channel]));
        return msg.offerer ? entry.pc.start() : undefined;
      }).catch((e) => console.warn(`peer ${msg.id}: ${e.message || e}`));
      peers.set(msg.id, entry);
    } else if (msg.type === 'peer-signal') {
      const entry = peers.get(msg.id);
      if (!entry) return; // a connection this page does not hold (relayed, or closed)
      entry.chain = entry.chain.then(() => entry.pc && entry.pc.signal(msg.signal, msg.text))
        .catch((e) => console.warn(`peer ${msg.id}: ${e.message || e}`));
    } else if (msg.type === 'peer-close') {
      for (const [id, entry] of peers) {
        if (!id.startsWith(`${msg.session}/`)) continue;
        peers.delete(id);
        entry.chain.then(() => { if (entry.pc) { entry.pc.close(); entry.pc.free(); } });
      }
    }
  });
}
