// y[m, n] = sum_k x[m, k] * w[n, k] + b[n] for few rows (decoding): one workgroup of 64 threads
// per output column n and row m, reducing K cooperatively.
struct Params { m: u32, k: u32, n: u32, has_bias: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> part: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let col = wid.y * nwg.x + wid.x;
    let row = wid.z;
    if (col >= p.n) { return; }
    var acc = 0.0;
    for (var k = lid.x; k < p.k; k += 64u) {
        acc = fma(x[row * p.k + k], w[col * p.k + k], acc);
    }
    part[lid.x] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid.x < s) { part[lid.x] += part[lid.x + s]; }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        var v = part[0];
        if (p.has_bias != 0u) { v += b[col]; }
        y[row * p.n + col] = v;
    }
}
