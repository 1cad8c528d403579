// A browser tab as one stage of a pipeline session: the coordinator splits SmolLM2 into two
// stages, runs two pipelines of the same session on three native workers and one tab, and
// accepts each token only when both pipelines agree. The tab computes its stage on WebGPU
// (SwiftShader) or on the wasm CPU path, and talks to its native neighbour over a real WebRTC
// data channel (RTCPeerConnection in the page, the data channel transferred to the
// volunteer's Web Worker, the webrtc crate on the native side), or through the coordinator's
// relay when the volunteer chose so; and when the tab is closed in the middle of a
// generation, the coordinator rebuilds the pipeline on native workers and the answer is
// still the whole model's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { launch } from './harness.mjs';
import { Cluster, localGeneration, openVolunteer } from './cluster.mjs';

const MODEL = 'SmolLM2-135M-Instruct';
const PIPELINE = ['--pipeline', '2', '--canary-rate', '0', '--audit-rate', '0', '--pipeline-direct-secs', '10'];

async function waitForWorkers(cluster, n) {
  for (let i = 0; i < 600; i++) {
    const health = await (await fetch(`${cluster.url}/healthz`)).json();
    if (health.workers_connected >= n) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`fewer than ${n} workers connected\n${cluster.diagnostics()}`);
}

async function metric(cluster, name) {
  const text = await (await fetch(`${cluster.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  assert.ok(line, `no metric ${name}`);
  return Number(line.split(' ')[1]);
}

async function lastJob(cluster) {
  const jobs = (await cluster.api('/v1/jobs')).data;
  assert.ok(jobs.length >= 1);
  return jobs[0];
}

for (const [links, webgpu] of [['direct', true], ['direct', false], ['relayed', false]]) {
  test(`a browser tab runs a pipeline stage (${webgpu ? 'WebGPU' : 'wasm CPU'}) next to native workers (${links} links), and the tokens are the whole model's`, { timeout: 600_000 }, async () => {
    const cluster = await Cluster.start({ extra: PIPELINE });
    const browser = await launch({ webgpu });
    try {
      for (const n of ['a', 'b', 'c']) cluster.addWorker(`native-${n}`);
      const v = await openVolunteer(browser, `${cluster.url}/`,
        { backend: webgpu ? 'gpu' : 'auto', ...(links === 'relayed' ? { stageLinks: 'relay' } : {}) });
      assert.match(await v.page.textContent('#device'), webgpu ? /^GPU \(WebGPU/ : /^CPU \(wasm/);
      // The page shows the memory it offers stages (its default from the device).
      await v.page.waitForFunction(() => /^\d+ \(default\)$/.test(document.getElementById('stage-mb').placeholder));
      await waitForWorkers(cluster, 4);
      const prompt = 'The three primary colours are';
      const want = localGeneration(prompt, 16);
      const r = await cluster.api('/v1/completions', { model: MODEL, prompt, max_tokens: 16, temperature: 0 });
      assert.equal(r.choices[0].text, want, cluster.diagnostics());
      const job = await lastJob(cluster);
      assert.equal(job.status, 'done');
      assert.equal(job.pipeline.stages, 2, JSON.stringify(job));
      assert.equal(job.pipeline.pipelines, 2, JSON.stringify(job));
      assert.equal(job.pipeline.liars, 0, JSON.stringify(job));
      // Two pipelines of two stages: one link each. Four stage workers for four positions:
      // the tab is one of them, and its link went the way it chose.
      if (links === 'direct') {
        assert.equal(job.pipeline.links_direct, 2, JSON.stringify(job));
        // Not one activation byte went through the coordinator.
        assert.equal(await metric(cluster, 'tabula_pipeline_relayed_bytes_total'), 0);
      } else {
        assert.ok(job.pipeline.links_relayed >= 1, JSON.stringify(job));
        assert.ok(await metric(cluster, 'tabula_pipeline_relayed_bytes_total') > 0);
      }
      // The tab served a stage, was credited for it, and was never struck.
      const entry = await cluster.ledger(v.key);
      assert.ok(entry, 'the tab is not in the ledger');
      assert.ok(entry.workers[0].verified_credit > 0, JSON.stringify(entry));
      assert.equal(entry.workers[0].strikes, 0, JSON.stringify(entry));
      await v.page.waitForFunction(() => /finished stage/.test(document.getElementById('phase').textContent)
        || document.getElementById('phase').textContent.startsWith('Connected'), null, { timeout: 30_000 });
      assert.deepEqual(v.errors, []);
    } finally {
      await browser.close();
      await cluster.stop();
    }
  });
}

test('closing a tab that serves a stage mid-generation: the pipeline is rebuilt and the answer is unchanged', { timeout: 600_000 }, async () => {
  const cluster = await Cluster.start({ extra: PIPELINE });
  const browser = await launch({ webgpu: false });
  try {
    for (const n of ['a', 'b', 'c']) cluster.addWorker(`native-${n}`);
    const v = await openVolunteer(browser, `${cluster.url}/`);
    await waitForWorkers(cluster, 4);
    const prompt = 'Write a short story about a lighthouse keeper.';
    const want = localGeneration(prompt, 96);
    const answer = cluster.api('/v1/completions', { model: MODEL, prompt, max_tokens: 96, temperature: 0 });
    // Once the tab computes its stage, two spare native workers arrive (a rebuilt pipeline
    // has all new members: its old ones never rejoin the session) and the tab closes.
    await v.page.waitForFunction(() => /running stage/.test(document.getElementById('phase').textContent), null, { timeout: 120_000 });
    cluster.addWorker('native-spare-1');
    cluster.addWorker('native-spare-2');
    await waitForWorkers(cluster, 6);
    await v.context.close();
    const r = await answer;
    assert.equal(r.choices[0].text, want, cluster.diagnostics());
    const job = await lastJob(cluster);
    assert.equal(job.status, 'done');
    assert.ok(job.pipeline.rebuilds >= 1, `the closed tab's pipeline was rebuilt: ${JSON.stringify(job)}`);
    // Leaving is not cheating: no strike for the tab.
    const entry = await cluster.ledger(v.key);
    if (entry) assert.equal(entry.workers[0].strikes, 0, JSON.stringify(entry));
  } finally {
    await browser.close();
    await cluster.stop();
  }
});
