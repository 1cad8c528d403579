// Gathers, rotary embedding and pooling. Each entry point declares its own bindings.
struct Params { rows: u32, cols: u32, a: u32, b: u32, f: f32 }

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}

// dst[r, c] = src[idx[r], c]; rows = ids, cols = dim. Ids are validated on the host.
@compute @workgroup_size(256)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i >= p.rows * p.cols) { return; }
    let r = i / p.cols;
    let c = i % p.cols;
    dst[i] = src[idx[r] * p.cols + c];
}

// Rotary embedding on adjacent pairs; a = head_dim, b = position of row 0, idx = the f32 bits
// of each pair's frequency. One thread per pair.
@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let pair = index(wid, nwg, lid);
    let half_cols = p.cols / 2u;
    if (pair >= p.rows * half_cols) { return; }
    let r = pair / half_cols;
    let c = (pair % half_cols) * 2u;
    let i = (c % p.a) / 2u;
    let pos = f32(p.b + r);
    let freq = bitcast<f32>(idx[i]);
    let angle = pos * freq;
    let s = sin(angle);
    let co = cos(angle);
    let at = r * p.cols + c;
    let x0 = src[at];
    let x1 = src[at + 1u];
    dst[at] = x0 * co - x1 * s;
    dst[at + 1u] = x0 * s + x1 * co;
}

// Mean over the first idx[b] rows of each block of a (= seq) rows; rows = batch, cols = dim.
@compute @workgroup_size(256)
fn mean_pool(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i >= p.rows * p.cols) { return; }
    let b = i / p.cols;
    let c = i % p.cols;
    let len = idx[b];
    var acc = 0.0;
    for (var r = 0u; r < len; r++) { acc += src[(b * p.a + r) * p.cols + c]; }
    dst[i] = acc / f32(len);
}
