// Scaled dot-product attention, one invocation per (query row, head), online softmax over the
// visible keys, vec4 loads, no workgroup memory or barriers (see linear4.wgsl for why).
// Requires head_dim % 4 == 0 and head_dim <= 4 · the accumulator's length (128 here; the host
// builds a second pipeline with a longer accumulator for wider heads).
struct Params {
    batch: u32, q_len: u32, kv_rows: u32, heads: u32,
    kv_heads: u32, head_dim: u32, causal: u32, pos_offset: u32,
    scale: f32, window: u32,
}
@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> kv_lens: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<vec4<f32>>;
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv = gid.y * nwg.x * 64u + gid.x;
    if (inv >= p.batch * p.q_len * p.heads) { return; }
    let row = inv / p.heads;
    let h = inv % p.heads;
    let bq = row / p.q_len;
    let i = row % p.q_len;
    var visible = kv_lens[bq];
    if (p.causal != 0u) { visible = min(visible, p.pos_offset + i + 1u); }
    // A sliding window of w keys: positions > pos - w only.
    var first = 0u;
    if (p.window != 0u && p.pos_offset + i + 1u > p.window) { first = p.pos_offset + i + 1u - p.window; }
    let d4 = p.head_dim / 4u;
    let kvh = h / (p.heads / p.kv_heads);
    let q_at = (row * p.heads + h) * d4;
    let kv_stride = p.kv_heads * d4;
    let kv_at = bq * p.kv_rows * kv_stride + kvh * d4;
    var acc: array<vec4<f32>, 32>;
    for (var t = 0u; t < d4; t++) { acc[t] = vec4<f32>(0.0); }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = first; j < visible; j++) {
        let kr = kv_at + j * kv_stride;
        var dot_qk = 0.0;
        for (var t = 0u; t < d4; t++) { dot_qk += dot(q[q_at + t], k[kr + t]); }
        let s = dot_qk * p.scale;
        var weight = 1.0;
        if (s > m) {
            let corr = exp(m - s);
            l *= corr;
            for (var t = 0u; t < d4; t++) { acc[t] *= corr; }
            m = s;
        } else {
            weight = exp(s - m);
        }
        l += weight;
        for (var t = 0u; t < d4; t++) { acc[t] += weight * v[kr + t]; }
    }
    let inv_l = 1.0 / l;
    for (var t = 0u; t < d4; t++) { o[q_at + t] = acc[t] * inv_l; }
}
