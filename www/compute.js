// A compute worker of the volunteer's pool: the session's worker (worker.js) starts one per
// thread the volunteer's throttle allows, when the page computes on the CPU. It holds no key
// and no socket: it takes a unit's task, loads the model's files it lacks (Cache API, else
// the coordinator), computes, and returns the output for the session's worker to sign.
//
// Messages in:  {type: 'unit', id, coordinator, task: Uint8Array}
// Messages out: {type: 'done', id, output: Uint8Array}  {type: 'failed', id, message}
//               {type: 'status', message}  (downloads, for the page)
import { evict, loadEngine, weights } from './engine.js';

const computer = loadEngine().then(({ Computer }) => new Computer());

async function compute({ id, coordinator, task }) {
  const report = (s) => postMessage({ type: 'status', message: s.message });
  let files = [];
  try {
    const c = await computer;
    files = c.neededFiles(task);
    const bytes = [];
    for (const f of files) bytes.push(await weights(coordinator, f, report));
    const output = await c.run(task, bytes);
    postMessage({ type: 'done', id, output }, [output.buffer]);
  } catch (e) {
    const message = String(e && e.message || e);
    if (message.includes('hashes to')) await evict(coordinator, files);
    postMessage({ type: 'failed', id, message });
  }
}

onmessage = (m) => {
  if (m.data && m.data.type === 'unit') compute(m.data);
};
