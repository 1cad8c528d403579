// LayerNorm / RMSNorm over the last dimension: one 256-thread workgroup per row, two-pass
// (mean, then centred variance) like the CPU reference.
struct Params { rows: u32, cols: u32, eps: f32, rms: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> gamma: array<f32>;
@group(0) @binding(2) var<storage, read> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> part: array<f32, 256>;

fn reduce_sum(v: f32, lid: u32) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { part[lid] += part[lid + s]; }
        workgroupBarrier();
    }
    let total = part[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let lid = lid3.x;
    let base = row * p.cols;
    let n = f32(p.cols);
    var mean = 0.0;
    if (p.rms == 0u) {
        var s = 0.0;
        for (var c = lid; c < p.cols; c += 256u) { s += x[base + c]; }
        mean = reduce_sum(s, lid) / n;
    }
    var sq = 0.0;
    for (var c = lid; c < p.cols; c += 256u) { let d = x[base + c] - mean; sq = fma(d, d, sq); }
    let inv = 1.0 / sqrt(reduce_sum(sq, lid) / n + p.eps);
    for (var c = lid; c < p.cols; c += 256u) {
        var v = (x[base + c] - mean) * inv * gamma[c];
        if (p.rms == 0u) { v += beta[c]; }
        y[base + c] = v;
    }
}
