// The extension's service worker: keeps one offscreen document alive while the volunteer runs
// (service workers cannot hold a WebSocket or WebGPU for long), relays the popup's commands to
// it, and remembers the latest status for the popup.

const OFFSCREEN = 'offscreen.html';

async function ensureOffscreen() {
  const existing = await chrome.runtime.getContexts({ contextTypes: ['OFFSCREEN_DOCUMENT'] });
  if (existing.length) return;
  await chrome.offscreen.createDocument({
    url: OFFSCREEN,
    reasons: ['WORKERS', 'WEB_RTC'],
    justification: 'Runs the volunteer compute worker (WebSocket to the coordinator, WebGPU or wasm) and the peer connections of pipeline stages.',
  });
}

chrome.runtime.onMessage.addListener((msg, _sender, reply) => {
  if (msg.target === 'background' && msg.type === 'status') {
    chrome.storage.session.set({ status: msg.status });
    return false;
  }
  if (msg.target === 'background' && msg.type === 'command') {
    (async () => {
      if (msg.command.type === 'start') await ensureOffscreen();
      const existing = await chrome.runtime.getContexts({ contextTypes: ['OFFSCREEN_DOCUMENT'] });
      if (existing.length) await chrome.runtime.sendMessage({ target: 'offscreen', ...msg.command });
      reply({ ok: true });
    })().catch((e) => reply({ ok: false, error: String(e && e.message || e) }));
    return true; // the reply is asynchronous
  }
  return false;
});
