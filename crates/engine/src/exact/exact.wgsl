// Exact-precision kernels: the integer specification of `exact/mod.rs`, op for op. Every
// helper here mirrors a Rust function of the same name; `tests/exact_bits.rs` compares the two.
// WGSL has no 64-bit integers, so `mul_shift` assembles its product from 16-bit limbs.
// Integer overflow wraps in WGSL as it does in the Rust code (`wrapping_*`).
//
// All entry points share these bindings and use a subset; what each binding holds is written
// above each entry point. `DOT4` is replaced by the host with `dot4I8Packed` where the adapter
// offers packed integer dot products, or with the portable `dot4_unpacked` (same result).

struct Params {
    n0: u32, n1: u32, n2: u32, n3: u32,
    n4: u32, n5: u32, n6: u32, n7: u32,
    n8: u32, n9: u32, n10: u32, n11: u32,
    s0: i32, s1: i32, s2: i32, s3: i32,
}

@group(0) @binding(0) var<storage, read> a: array<i32>;
@group(0) @binding(1) var<storage, read> b: array<i32>;
@group(0) @binding(2) var<storage, read> c: array<i32>;
@group(0) @binding(3) var<storage, read> d: array<i32>;
@group(0) @binding(4) var<storage, read_write> out: array<i32>;
@group(0) @binding(5) var<uniform> p: Params;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * 64u + gid.x;
}

fn abs_u(v: i32) -> u32 {
    // abs(i32 min) is i32 min, whose bits read as 2^31: the true magnitude.
    return bitcast<u32>(abs(v));
}

fn bit_len(x: u32) -> u32 {
    return 32u - countLeadingZeros(x);
}

// (lo, hi) of the 64-bit product a · b.
fn mul_wide(x: u32, y: u32) -> vec2<u32> {
    let x0 = x & 0xFFFFu;
    let x1 = x >> 16u;
    let y0 = y & 0xFFFFu;
    let y1 = y >> 16u;
    let p00 = x0 * y0;
    let p01 = x0 * y1;
    let p10 = x1 * y0;
    let p11 = x1 * y1;
    let mid = p01 + p10;
    let mid_carry = select(0u, 0x10000u, mid < p01);
    let lo = p00 + (mid << 16u);
    let lo_carry = select(0u, 1u, lo < p00);
    return vec2<u32>(lo, p11 + (mid >> 16u) + mid_carry + lo_carry);
}

fn mul_shift(x: i32, y: i32, s: i32) -> i32 {
    let negative = (x < 0) != (y < 0);
    let prod = mul_wide(abs_u(x), abs_u(y));
    var lo = prod.x;
    var hi = prod.y;
    var mag = 0u;
    if (s > 0) {
        if (s >= 63) { return 0; }
        let su = u32(s);
        if (su <= 32u) {
            let sum = lo + (1u << (su - 1u));
            hi += select(0u, 1u, sum < lo);
            lo = sum;
        } else {
            hi += 1u << (su - 33u);
        }
        var rlo = 0u;
        var rhi = 0u;
        if (su < 32u) {
            rlo = (lo >> su) | (hi << (32u - su));
            rhi = hi >> su;
        } else {
            rlo = hi >> (su - 32u);
        }
        mag = select(rlo, 0x7FFFFFFFu, rhi != 0u || rlo > 0x7FFFFFFFu);
    } else {
        let l = u32(-s);
        if (lo == 0u && hi == 0u) {
            mag = 0u;
        } else if (l >= 32u || hi != 0u || lo > (0x7FFFFFFFu >> l)) {
            mag = 0x7FFFFFFFu;
        } else {
            mag = lo << l;
        }
    }
    let m = i32(mag);
    return select(m, -m, negative);
}

fn div_round(x: i32, y: u32) -> i32 {
    // |x| <= 2^31 and y / 2 < 2^31: the sum fits in 32 bits only when y is small, so split.
    let q = abs_u(x) / y;
    let r = abs_u(x) % y;
    let m = q + select(0u, 1u, r >= y - y / 2u);
    let mag = i32(min(m, 0x7FFFFFFFu));
    return select(mag, -mag, x < 0);
}

fn isqrt(n: u32) -> u32 {
    var rest = n;
    var root = 0u;
    var bit = 1u << 30u;
    while (bit > n) { bit >>= 2u; }
    while (bit != 0u) {
        if (rest >= root + bit) {
            rest -= root + bit;
            root = (root >> 1u) + bit;
        } else {
            root >>= 1u;
        }
        bit >>= 2u;
    }
    return root;
}

fn dot4_unpacked(x: u32, y: u32) -> i32 {
    let xi = bitcast<i32>(x);
    let yi = bitcast<i32>(y);
    var sum = 0;
    for (var i = 0u; i < 32u; i += 8u) {
        sum += extractBits(xi, i, 8u) * extractBits(yi, i, 8u);
    }
    return sum;
}

fn dot4(x: i32, y: i32) -> i32 {
    return DOT4(bitcast<u32>(x), bitcast<u32>(y));
}

fn requantize(acc: i32, reduced: i32, shift: i32, mult: i32, e: i32) -> i32 {
    let combined = mul_shift(reduced, mult, 15);
    return mul_shift(acc, combined, e - 15 - shift);
}

// a: Fx input; out: packed int8 words, then (reduced, shift) per group at n2.
// n0 = groups, n1 = group size, n2 = scales offset (words).
@compute @workgroup_size(64)
fn quantize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = index(gid, nwg);
    if (g >= p.n0) { return; }
    let size = p.n1;
    let base = g * size;
    var amax = 0u;
    for (var i = 0u; i < size; i++) { amax = max(amax, abs_u(a[base + i])); }
    let len = bit_len(amax);
    let shift = select(0u, len - 15u, len > 15u);
    let reduced = amax >> shift;
    for (var w = 0u; w < size / 4u; w++) {
        var packed = 0u;
        for (var j = 0u; j < 4u; j++) {
            let v = a[base + 4u * w + j];
            var q = 0;
            if (reduced != 0u) {
                let m = abs_u(v) >> shift;
                let r = i32((m * 254u + reduced) / (2u * reduced));
                q = select(r, -r, v < 0);
            }
            packed |= (bitcast<u32>(q) & 0xFFu) << (8u * j);
        }
        out[base / 4u + w] = bitcast<i32>(packed);
    }
    out[p.n2 + 2u * g] = i32(reduced);
    out[p.n2 + 2u * g + 1u] = i32(shift);
}

// a: quantised x (scales at n4, groups of n5 values), b: int8 weight words, c: (M, E) per
// channel and block of n6 values, d: bias. n0 = m, n1 = k, n2 = n, n3 = has bias. A 4×4 output block per invocation,
// workgroup 8×8; each group's sums are requantised and added to the block, as on the CPU.
@compute @workgroup_size(8, 8)
fn qlinear(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.y * 4u;
    let c0 = gid.x * 4u;
    if (r0 >= p.n0 || c0 >= p.n2) { return; }
    let k4 = p.n1 / 4u;
    let gw = p.n5 / 4u;
    let groups = p.n1 / p.n5;
    let w_groups = p.n1 / p.n6;
    let per_w = p.n6 / p.n5;
    var cols = array<u32, 4>(c0, min(c0 + 1u, p.n2 - 1u), min(c0 + 2u, p.n2 - 1u), min(c0 + 3u, p.n2 - 1u));
    var rows = array<u32, 4>(r0, min(r0 + 1u, p.n0 - 1u), min(r0 + 2u, p.n0 - 1u), min(r0 + 3u, p.n0 - 1u));
    var y: array<vec4<i32>, 4>;
    for (var j = 0u; j < 4u; j++) {
        if (p.n3 != 0u) {
            let bias = d[cols[j]];
            for (var i = 0u; i < 4u; i++) { y[i][j] = bias; }
        }
    }
    // Declared once and zeroed explicitly per group: SwiftShader (Chromium) does not
    // re-initialise a `var` declared inside a loop body, which WGSL requires.
    var acc: array<vec4<i32>, 4>;
    for (var g = 0u; g < groups; g++) {
        for (var i = 0u; i < 4u; i++) { acc[i] = vec4<i32>(0); }
        for (var kk = g * gw; kk < (g + 1u) * gw; kk++) {
            let w = vec4<i32>(b[cols[0] * k4 + kk], b[cols[1] * k4 + kk], b[cols[2] * k4 + kk], b[cols[3] * k4 + kk]);
            for (var i = 0u; i < 4u; i++) {
                let x = a[rows[i] * k4 + kk];
                acc[i] += vec4<i32>(dot4(x, w.x), dot4(x, w.y), dot4(x, w.z), dot4(x, w.w));
            }
        }
        for (var i = 0u; i < 4u; i++) {
            let at = p.n4 + 2u * (rows[i] * groups + g);
            let reduced = a[at];
            let shift = a[at + 1u];
            for (var j = 0u; j < 4u; j++) {
                let wat = 2u * (cols[j] * w_groups + g / per_w);
                y[i][j] += requantize(acc[i][j], reduced, shift, c[wat], c[wat + 1u]);
            }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let r = r0 + i;
        if (r >= p.n0) { break; }
        for (var j = 0u; j < 4u; j++) {
            let col = c0 + j;
            if (col >= p.n2) { break; }
            out[r * p.n2 + col] = y[i][j];
        }
    }
}

// a: int8 table words, b: (M, E) per row and block of n2 values, c: ids. n0 = ids, n1 = dim.
// One value per invocation.
@compute @workgroup_size(64)
fn qembedding(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n0 * p.n1) { return; }
    let row = u32(c[i / p.n1]);
    let col = i % p.n1;
    let word = a[(row * p.n1 + col) / 4u];
    let q = extractBits(word, 8u * (col % 4u), 8u);
    let at = 2u * (row * (p.n1 / p.n2) + col / p.n2);
    out[i] = mul_shift(q, b[at], b[at + 1u]);
}

// a: word table, c: ids. n0 = ids, n1 = dim.
@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n0 * p.n1) { return; }
    out[i] = a[u32(c[i / p.n1]) * p.n1 + i % p.n1];
}

// out = a + b (wrapping). n0 = length.
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n0) { return; }
    out[i] = a[i] + b[i];
}

// out = mul_shift(a, b, s0). n0 = length.
@compute @workgroup_size(64)
fn mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n0) { return; }
    out[i] = mul_shift(a[i], b[i], p.s0);
}

// a: x, b: gamma (Q16), c: beta (Fx). n0 = rows, n1 = cols, n2 = has beta, n3 = frac bits.
// One row per invocation; see `norm_row` in exact/cpu.rs for the method.
@compute @workgroup_size(64)
fn norm(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = index(gid, nwg);
    if (r >= p.n0) { return; }
    let cols = p.n1;
    let base = r * cols;
    let has_beta = p.n2 != 0u;
    var mean = 0;
    if (has_beta) {
        var sum = 0;
        for (var i = 0u; i < cols; i++) { sum += a[base + i]; }
        mean = div_round(sum, cols);
    }
    var amax = 0u;
    for (var i = 0u; i < cols; i++) { amax = max(amax, abs_u(a[base + i] - mean)); }
    if (amax == 0u) {
        for (var i = 0u; i < cols; i++) { out[base + i] = select(0, c[i], has_beta); }
        return;
    }
    let s = i32(bit_len(amax)) - 15;
    var sq = 0u;
    for (var i = 0u; i < cols; i++) {
        let xc = a[base + i] - mean;
        var xs = 0;
        if (s >= 0) { xs = xc >> u32(s); } else { xs = xc << u32(-s); }
        let m = abs_u(xs);
        sq += (m * m) >> 8u;
    }
    var v = max(sq / cols, 1u);
    var t = 0;
    while (v < (1u << 28u)) {
        v <<= 2u;
        t += 1;
    }
    let inv = i32((1u << 30u) / isqrt(v));
    let gamma_shift = 32 - i32(p.n3);
    for (var i = 0u; i < cols; i++) {
        let nrm = mul_shift(a[base + i] - mean, inv, 18 - t + s);
        var y = mul_shift(nrm, b[i], gamma_shift);
        if (has_beta) { y += c[i]; }
        out[base + i] = y;
    }
}

// a: x, b: table (n1 + 1 entries). n0 = length, n1 = table steps, n2 = step shift, s0 = lo.
@compute @workgroup_size(64)
fn act(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n0) { return; }
    let x = a[i];
    if (x < p.s0) {
        out[i] = 0;
        return;
    }
    let u = bitcast<u32>(x) - bitcast<u32>(p.s0);
    let idx = u >> p.n2;
    if (idx >= p.n1) {
        out[i] = x;
        return;
    }
    let frac = i32(u & ((1u << p.n2) - 1u));
    let base = b[idx];
    out[i] = base + mul_shift(b[idx + 1u] - base, frac, i32(p.n2));
}

// a: x, b: (cos, sin) Q30 table. n0 = rows, n1 = cols, n2 = head_dim, n3 = position of row 0.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let pair = index(gid, nwg);
    let half_cols = p.n1 / 2u;
    if (pair >= p.n0 * half_cols) { return; }
    let r = pair / half_cols;
    let within = (2u * (pair % half_cols)) % p.n2;
    let at = r * p.n1 + 2u * (pair % half_cols);
    let t = (p.n3 + r) * p.n2 + within;
    let x = a[at];
    let y = a[at + 1u];
    let cs = b[t];
    let sn = b[t + 1u];
    out[at] = mul_shift(x, cs, 30) - mul_shift(y, sn, 30);
    out[at + 1u] = mul_shift(x, sn, 30) + mul_shift(y, cs, 30);
}

fn exp2_neg_q15(dd: u32) -> u32 {
    let int_part = dd >> 16u;
    if (int_part >= 16u) { return 0u; }
    let frac = dd & 0xFFFFu;
    let idx = frac >> 8u;
    let low = i32(frac & 0xFFu);
    let hi = d[idx];
    let v = hi - mul_shift(hi - d[idx + 1u], low, 8);
    return u32(mul_shift(v, 1, 15 + i32(int_part)));
}

fn score(acc: i32, qr: i32, qs: i32, kr: i32, ks: i32) -> i32 {
    let combined = mul_shift(qr * kr, p.s0, 30);
    return mul_shift(acc, combined, p.s1 - 30 - qs - ks);
}

fn qk_dot(qg: u32, kg: u32, words: u32) -> i32 {
    var acc = 0;
    for (var w = 0u; w < words; w++) { acc += dot4(a[qg * words + w], b[kg * words + w]); }
    return acc;
}

// a, b, c: quantised q, k, v (scales at n8, n9, n10); d: the exp2 table (257 entries), then
// kv_lens. n0..n7 = batch, q_len, kv_rows, heads, kv_heads, head_dim, causal, pos_offset;
// n11 = sliding window (0: none); head_dim at most 4 · the accumulator's length (a second
// pipeline with a longer one serves wide heads);
// s0, s1 = score scale (M, E). One (query row, head) per invocation, three passes over keys.
@compute @workgroup_size(64)
fn attention(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv = index(gid, nwg);
    if (inv >= p.n0 * p.n1 * p.n3) { return; }
    let row = inv / p.n3;
    let h = inv % p.n3;
    let bq = row / p.n1;
    let i = row % p.n1;
    var visible = u32(d[257u + bq]);
    if (p.n6 != 0u) { visible = min(visible, p.n7 + i + 1u); }
    // A sliding window of n11 keys (0: none): positions > pos - n11 only.
    var first = 0u;
    if (p.n11 != 0u && p.n7 + i + 1u > p.n11) { first = min(p.n7 + i + 1u - p.n11, visible); }
    let words = p.n5 / 4u;
    let kvh = h / (p.n3 / p.n4);
    let qg = row * p.n3 + h;
    let qr = a[p.n8 + 2u * qg];
    let qs = a[p.n8 + 2u * qg + 1u];
    var best = -2147483647 - 1;
    for (var j = first; j < visible; j++) {
        let kg = (bq * p.n2 + j) * p.n4 + kvh;
        let sc = score(qk_dot(qg, kg, words), qr, qs, b[p.n9 + 2u * kg], b[p.n9 + 2u * kg + 1u]);
        best = max(best, sc);
    }
    var sum = 0u;
    for (var j = first; j < visible; j++) {
        let kg = (bq * p.n2 + j) * p.n4 + kvh;
        let sc = score(qk_dot(qg, kg, words), qr, qs, b[p.n9 + 2u * kg], b[p.n9 + 2u * kg + 1u]);
        sum += exp2_neg_q15(bitcast<u32>(best) - bitcast<u32>(sc));
    }
    var acc: array<vec4<i32>, 32>;
    for (var j = first; j < visible; j++) {
        let kg = (bq * p.n2 + j) * p.n4 + kvh;
        let sc = score(qk_dot(qg, kg, words), qr, qs, b[p.n9 + 2u * kg], b[p.n9 + 2u * kg + 1u]);
        let e = exp2_neg_q15(bitcast<u32>(best) - bitcast<u32>(sc));
        let prob = ((e << 16u) + sum / 2u) / sum;
        // value_weight: the row's scale (reduced · 2^7 / 127), then p · scale · 2^(shift - 15).
        let vscale = mul_shift(c[p.n10 + 2u * kg], 1082196484, 30);
        let w = mul_shift(i32(prob), vscale, 15 - c[p.n10 + 2u * kg + 1u]);
        for (var x = 0u; x < words; x++) {
            let packed = c[kg * words + x];
            let vq = vec4<i32>(extractBits(packed, 0u, 8u), extractBits(packed, 8u, 8u),
                               extractBits(packed, 16u, 8u), extractBits(packed, 24u, 8u));
            acc[x] += vq * w;
        }
    }
    let o = qg * p.n5;
    for (var x = 0u; x < words; x++) {
        for (var l = 0u; l < 4u; l++) {
            out[o + 4u * x + l] = mul_shift(acc[x][l], 1, 8);
        }
    }
}

// a: x, c: lens. n0 = batch, n1 = dim, n2 = rows per sequence. One (sequence, column) each.
@compute @workgroup_size(64)
fn mean_pool(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n0 * p.n1) { return; }
    let bq = i / p.n1;
    let col = i % p.n1;
    let len = u32(c[bq]);
    var sum = 0;
    for (var r = 0u; r < len; r++) { sum += a[(bq * p.n2 + r) * p.n1 + col]; }
    out[i] = div_round(sum, len);
}
