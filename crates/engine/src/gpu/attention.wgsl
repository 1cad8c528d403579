// Scaled dot-product attention with an online softmax: one 128-thread workgroup per (query row,
// head). Each chunk of 128 keys is scored in parallel (one key per thread), then every thread
// folds the chunk into the running max/sum, and thread d accumulates output dimension d.
// head_dim <= 128.
struct Params {
    batch: u32, q_len: u32, kv_rows: u32, heads: u32,
    kv_heads: u32, head_dim: u32, causal: u32, pos_offset: u32,
    scale: f32,
}
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> kv_lens: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

const CHUNK: u32 = 128u;
var<workgroup> s: array<f32, 128>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wid.x;
    let h = wid.y;
    let lid = lid3.x;
    let bq = row / p.q_len;
    let i = row % p.q_len;
    var visible = kv_lens[bq];
    if (p.causal != 0u) { visible = min(visible, p.pos_offset + i + 1u); }
    let kvh = h / (p.heads / p.kv_heads);
    let qw = p.heads * p.head_dim;
    let kvw = p.kv_heads * p.head_dim;
    let q_at = row * qw + h * p.head_dim;
    let kv_at = bq * p.kv_rows * kvw + kvh * p.head_dim;
    var m = -3.0e38;
    var l = 0.0;
    var acc = 0.0;
    for (var start = 0u; start < visible; start += CHUNK) {
        let j = start + lid;
        var score = -3.0e38;
        if (j < visible) {
            var dot = 0.0;
            for (var t = 0u; t < p.head_dim; t++) { dot = fma(q[q_at + t], k[kv_at + j * kvw + t], dot); }
            score = dot * p.scale;
        }
        s[lid] = score;
        workgroupBarrier();
        let n = min(CHUNK, visible - start);
        var cm = m;
        for (var t = 0u; t < n; t++) { cm = max(cm, s[t]); }
        let corr = exp(m - cm);
        l *= corr;
        acc *= corr;
        for (var t = 0u; t < n; t++) {
            let e = exp(s[t] - cm);
            l += e;
            if (lid < p.head_dim) { acc = fma(e, v[kv_at + (start + t) * kvw + lid], acc); }
        }
        m = cm;
        workgroupBarrier();
    }
    if (lid < p.head_dim) { o[q_at + lid] = acc / l; }
}
