// y[m, n] = sum_k x[m, k] * w[n, k] + b[n] for k % 4 == 0. Each invocation computes a 4×4 block
// of y straight from memory with vec4 loads and no workgroup barriers: on software adapters
// (lavapipe, SwiftShader: the devices CI and the benchmarks run on) barriers and workgroup
// memory cost far more than the CPU caches they would replace.
struct Params { m: u32, k: u32, n: u32, has_bias: u32 }
@group(0) @binding(0) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

fn row4(r: u32, limit: u32, kk: u32, k4: u32) -> vec4<f32> {
    // Rows past the end read row 0 (always valid); their results are never stored.
    return select(x[kk], x[r * k4 + kk], r < limit);
}

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.y * 4u;
    let c0 = gid.x * 4u;
    if (r0 >= p.m || c0 >= p.n) { return; }
    let k4 = p.k / 4u;
    let c1 = min(c0 + 1u, p.n - 1u);
    let c2 = min(c0 + 2u, p.n - 1u);
    let c3 = min(c0 + 3u, p.n - 1u);
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < k4; kk++) {
        let w0 = w[c0 * k4 + kk];
        let w1 = w[c1 * k4 + kk];
        let w2 = w[c2 * k4 + kk];
        let w3 = w[c3 * k4 + kk];
        let x0 = row4(r0, p.m, kk, k4);
        let x1 = row4(r0 + 1u, p.m, kk, k4);
        let x2 = row4(r0 + 2u, p.m, kk, k4);
        let x3 = row4(r0 + 3u, p.m, kk, k4);
        a0 += vec4<f32>(dot(x0, w0), dot(x0, w1), dot(x0, w2), dot(x0, w3));
        a1 += vec4<f32>(dot(x1, w0), dot(x1, w1), dot(x1, w2), dot(x1, w3));
        a2 += vec4<f32>(dot(x2, w0), dot(x2, w1), dot(x2, w2), dot(x2, w3));
        a3 += vec4<f32>(dot(x3, w0), dot(x3, w1), dot(x3, w2), dot(x3, w3));
    }
    var bias = vec4<f32>(0.0);
    if (p.has_bias != 0u) { bias = vec4<f32>(b[c0], b[c1], b[c2], b[c3]); }
    let acc = array<vec4<f32>, 4>(a0 + bias, a1 + bias, a2 + bias, a3 + bias);
    for (var i = 0u; i < 4u; i++) {
        let r = r0 + i;
        if (r >= p.m) { break; }
        for (var j = 0u; j < 4u; j++) {
            if (c0 + j < p.n) { y[r * p.n + c0 + j] = acc[i][j]; }
        }
    }
}
