// LayerNorm / RMSNorm over the last dimension: one invocation per row, two-pass (mean, then
// centred variance) like the CPU reference; no barriers (see linear4.wgsl).
struct Params { rows: u32, cols: u32, eps: f32, rms: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> gamma: array<f32>;
@group(0) @binding(2) var<storage, read> beta: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.y * nwg.x * 64u + gid.x;
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    let n = f32(p.cols);
    var mean = 0.0;
    if (p.rms == 0u) {
        var s = 0.0;
        for (var c = 0u; c < p.cols; c++) { s += x[base + c]; }
        mean = s / n;
    }
    var sq = 0.0;
    for (var c = 0u; c < p.cols; c++) { let d = x[base + c] - mean; sq = fma(d, d, sq); }
    let inv = 1.0 / sqrt(sq / n + p.eps);
    for (var c = 0u; c < p.cols; c++) {
        var v = (x[base + c] - mean) * inv * gamma[c];
        if (p.rms == 0u) { v += beta[c]; }
        y[base + c] = v;
    }
}
