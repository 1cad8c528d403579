// y[m, n] = sum_k x[m, k] * w[n, k] + b[n]  (w is row-major [n, k], i.e. PyTorch's Linear layout)
// 64×64 output tile per workgroup, 16×16 threads, each thread a 4×4 block; K in steps of 16.
struct Params { m: u32, k: u32, n: u32, has_bias: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

const TILE: u32 = 64u;
const KT: u32 = 16u;
var<workgroup> xs: array<f32, 1024>; // [TILE rows][KT]
var<workgroup> ws: array<f32, 1024>; // [TILE cols][KT]

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let t = lid.y * 16u + lid.x;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }
    for (var k0 = 0u; k0 < p.k; k0 += KT) {
        // 256 threads load 1024 elements of each tile: 4 each.
        for (var e = 0u; e < 4u; e++) {
            let idx = t * 4u + e;
            let r = idx / KT;
            let kk = idx % KT;
            let gk = k0 + kk;
            var xv = 0.0;
            if (row0 + r < p.m && gk < p.k) { xv = x[(row0 + r) * p.k + gk]; }
            xs[idx] = xv;
            var wv = 0.0;
            if (col0 + r < p.n && gk < p.k) { wv = w[(col0 + r) * p.k + gk]; }
            ws[idx] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            var xr: array<f32, 4>;
            var wr: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                xr[i] = xs[(lid.y * 4u + i) * KT + kk];
                wr[i] = ws[(lid.x * 4u + i) * KT + kk];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] = fma(xr[i], wr[j], acc[i * 4u + j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let c = col0 + lid.x * 4u + j;
            if (r < p.m && c < p.n) {
                var v = acc[i * 4u + j];
                if (p.has_bias != 0u) { v += b[c]; }
                y[r * p.n + c] = v;
            }
        }
    }
}
