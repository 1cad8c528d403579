// Elementwise ops over n values; 256 threads per workgroup, 2-D grid for large n.
// `f` is a scalar operand (bits of an f32) for the ops that take one.
struct Params { n: u32, f: f32 }
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid.x;
}

// Abramowitz & Stegun 7.1.26, as in the CPU backend's `erf`.
fn erf(v: f32) -> f32 {
    let s = sign(v);
    let x = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let poly = t * (0.2548296 + t * (-0.28449674 + t * (1.4214138 + t * (-1.4531521 + t * 1.0614054))));
    return s * (1.0 - poly * exp(-x * x));
}

@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) { y[i] = a[i] + b[i]; }
}

@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) { let g = a[i]; y[i] = g / (1.0 + exp(-g)) * b[i]; }
}

@compute @workgroup_size(256)
fn gelu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) { let v = a[i]; y[i] = 0.5 * v * (1.0 + erf(v * 0.70710678)); }
}

// GELU's tanh approximation times `b` (GeGLU), as the CPU backend's `gelu_tanh`.
@compute @workgroup_size(256)
fn gelu_tanh_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let x = a[i];
        let u = 0.7978846 * (x + 0.044715 * x * x * x);
        let t = 1.0 - 2.0 / (exp(min(2.0 * u, 88.0)) + 1.0);
        y[i] = 0.5 * x * (1.0 + t) * b[i];
    }
}

@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = index(wid, nwg, lid);
    if (i < p.n) { y[i] = a[i] * p.f; }
}
