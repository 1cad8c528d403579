//! A self-check of exact precision on a GPU: every integer op against the CPU reference, bit
//! for bit. Used by the native tests (`tests/exact_bits.rs`, lavapipe) and by the browser test
//! (WebGPU), so both run the same checks.

use std::cell::RefCell;

use crate::{
    AttentionParams, Result,
    cpu::CpuBackend,
    exact::{
        ActTable, ExactBackend, QActs, QMatrix, QNorm, RopeTable, ScoreScale, WeightLayout,
        kernels::{Kernel, with_kernel},
        split_scale,
    },
    gpu::GpuBackend,
};

/// Deterministic pseudo-random words.
fn words(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u32
        })
        .collect()
}

/// Values of every magnitude: each is random bits shifted right by a random amount.
fn ints(n: usize, seed: u64, max_bits: u32) -> Vec<i32> {
    let w = words(2 * n, seed);
    (0..n)
        .map(|i| (w[2 * i] as i32) >> (32 - max_bits + w[2 * i + 1] % max_bits))
        .collect()
}

struct Pair<'a> {
    gpu: &'a GpuBackend,
    diffs: RefCell<Vec<String>>,
}

type CpuT = <CpuBackend as ExactBackend>::Int;
type GpuT = <GpuBackend as ExactBackend>::Int;

impl Pair<'_> {
    fn up(&self, data: &[i32], shape: &[usize]) -> Result<(CpuT, GpuT)> {
        Ok((
            CpuBackend.upload_int(data, shape)?,
            self.gpu.upload_int(data, shape)?,
        ))
    }
    async fn same(&self, what: &str, c: &CpuT, g: &GpuT) -> Result<()> {
        let g = self.gpu.read_int(g).await?;
        let c = CpuBackend.read_int(c).await?;
        if c.len() != g.len() {
            self.diffs.borrow_mut().push(format!(
                "{what}: {} words on the CPU, {} on the GPU",
                c.len(),
                g.len()
            ));
        } else if let Some(i) = c.iter().zip(&g).position(|(a, b)| a != b) {
            self.diffs.borrow_mut().push(format!(
                "{what}: word {i} differs: cpu {} gpu {}",
                c[i], g[i]
            ));
        }
        Ok(())
    }
    fn must_fail<T>(&self, what: &str, result: Result<T>) {
        if result.is_ok() {
            self.diffs
                .borrow_mut()
                .push(format!("{what}: accepted a bad input"));
        }
    }
    async fn quantize(&self, x: &(CpuT, GpuT), group: usize) -> Result<(QActs<CpuT>, QActs<GpuT>)> {
        let c = CpuBackend.quantize(&x.0, group)?;
        let g = self.gpu.quantize(&x.1, group)?;
        self.same("quantize", &c.buf, &g.buf).await?;
        Ok((c, g))
    }
    fn matrix(
        &self,
        rows: usize,
        cols: usize,
        group: usize,
        seed: u64,
        bias: bool,
    ) -> Result<(QMatrix<CpuT>, QMatrix<GpuT>)> {
        let data: Vec<i32> = words(rows * cols / 4, seed)
            .into_iter()
            .map(|w| w as i32)
            .collect();
        let blocks = rows * cols / group;
        let mut requant = Vec::new();
        for (i, w) in words(blocks, seed + 1).into_iter().enumerate() {
            let (m, e) = split_scale(1e-5 * (1.0 + (w % 1000) as f64 / 100.0))?;
            requant.extend([m, e + (i % 3) as i32]);
        }
        let bias_data = ints(rows, seed + 2, 20);
        let d = self.up(&data, &[rows, cols / 4])?;
        let r = self.up(&requant, &[rows, cols / group, 2])?;
        let b = self.up(&bias_data, &[rows])?;
        Ok((
            QMatrix {
                rows,
                cols,
                group,
                data: d.0,
                requant: r.0,
                bias: bias.then_some(b.0),
                layout: WeightLayout::Rows,
            },
            QMatrix {
                rows,
                cols,
                group,
                data: d.1,
                requant: r.1,
                bias: bias.then_some(b.1),
                layout: WeightLayout::Rows,
            },
        ))
    }
}

/// A short exact workload for choosing where to compute: a quantised `64 × 384` activation
/// through a `384 → 1536` int8 layer, read back (37.7 M multiply-adds, the shape of a MiniLM
/// feed-forward layer). The same work on every backend; the caller times [`Self::run`].
pub struct Calibration<B: ExactBackend> {
    x: B::Int,
    w: QMatrix<B::Int>,
}

impl<B: ExactBackend> Calibration<B> {
    pub const ROWS: usize = 64;
    pub const COLS: usize = 384;
    pub const OUT: usize = 1536;

    /// Uploads the inputs (not part of the timing).
    pub fn new(b: &B) -> Result<Self> {
        let (m, k, n) = (Self::ROWS, Self::COLS, Self::OUT);
        let data: Vec<i32> = words(n * k / 4, 77).into_iter().map(|w| w as i32).collect();
        let mut requant = Vec::with_capacity(2 * n);
        for w in words(n, 78) {
            let (mult, exp) = split_scale(1e-5 * (1.0 + (w % 1000) as f64 / 100.0))?;
            requant.extend([mult, exp]);
        }
        Ok(Calibration {
            x: b.upload_int(&ints(m * k, 79, 24), &[m, k])?,
            w: b.prepare_qmatrix(QMatrix {
                rows: n,
                cols: k,
                group: k,
                data: b.upload_int(&data, &[n, k / 4])?,
                requant: b.upload_int(&requant, &[n, 1, 2])?,
                bias: None,
                layout: WeightLayout::Rows,
            })?,
        })
    }

    /// One run: quantise, multiply, read the result back.
    pub async fn run(&self, b: &B) -> Result<()> {
        let q = b.quantize(&self.x, 32)?;
        let y = b.qlinear(&q, &self.w)?;
        b.read_int(&y).await?;
        Ok(())
    }

    /// The best of three timed runs after a warm-up, in milliseconds of `now` (a clock in
    /// milliseconds: `Instant` natively, `Date.now()` in a browser); at least 0.1.
    pub async fn best_ms(&self, b: &B, now: impl Fn() -> f64) -> Result<f64> {
        self.run(b).await?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let start = now();
            self.run(b).await?;
            best = best.min(now() - start);
        }
        Ok(best.max(0.1))
    }
}

/// Every int8 matrix kernel this processor has ([`Kernel::supported_all`]) against the
/// reference kernel on pseudo-random products (every tail of tile and block, one scale per
/// row and per block, with and without bias): the kernels whose bits differ, empty when all
/// agree. Cheap (milliseconds): a worker runs it before computing in exact precision.
pub fn compare_cpu_kernels() -> Result<Vec<String>> {
    let cpu = CpuBackend;
    let mut diffs = Vec::new();
    for (m, k, n, bits, group, w_group, bias) in [
        (1, 384, 40, 20, 32, 384, false),
        (7, 128, 33, 24, 32, 32, true),
        (5, 64, 17, 31, 16, 64, true),
        (4, 96, 16, 3, 32, 96, false),
    ] {
        let x = cpu.upload_int(&ints(m * k, 30 + m as u64, bits), &[m, k])?;
        let q = cpu.quantize(&x, group)?;
        let data: Vec<i32> = words(n * k / 4, 40 + n as u64)
            .into_iter()
            .map(|w| w as i32)
            .collect();
        let mut requant = Vec::new();
        for (i, w) in words(n * k / w_group, 41 + n as u64)
            .into_iter()
            .enumerate()
        {
            let (mult, exp) = split_scale(1e-5 * (1.0 + (w % 1000) as f64 / 100.0))?;
            requant.extend([mult, exp + (i % 3) as i32]);
        }
        let w = cpu.prepare_qmatrix(QMatrix {
            rows: n,
            cols: k,
            group: w_group,
            data: cpu.upload_int(&data, &[n, k / 4])?,
            requant: cpu.upload_int(&requant, &[n, k / w_group, 2])?,
            bias: bias
                .then(|| cpu.upload_int(&ints(n, 42, 20), &[n]))
                .transpose()?,
            layout: WeightLayout::Rows,
        })?;
        let want = with_kernel(Kernel::Scalar, || cpu.qlinear(&q, &w)).expect("always")?;
        for kernel in Kernel::supported_all() {
            let got = with_kernel(kernel, || cpu.qlinear(&q, &w)).expect("supported")?;
            if let Some(i) = got.data().iter().zip(want.data()).position(|(a, b)| a != b) {
                diffs.push(format!(
                    "qlinear {m}x{k}x{n} groups {group}/{w_group}: {kernel} differs from scalar \
                     at output {i}: {} != {}",
                    got.data()[i],
                    want.data()[i]
                ));
            }
        }
    }
    Ok(diffs)
}

/// Runs every exact op on `gpu` and on the CPU with pseudo-random inputs (every magnitude,
/// odd shapes, extreme operands) and returns the ops whose bits differ; empty when all agree.
pub async fn compare_with_cpu(gpu: &GpuBackend) -> Result<Vec<String>> {
    let p = Pair {
        gpu,
        diffs: RefCell::new(Vec::new()),
    };

    // mul_shift over extreme operands and every shift, through the elementwise `mul`.
    let mut a = ints(4096, 1, 32);
    let mut b = ints(4096, 2, 32);
    a.extend([i32::MIN, i32::MAX, -1, 0, i32::MIN, 1 << 30]);
    b.extend([i32::MIN, i32::MAX, i32::MIN, 5, -1, 1 << 30]);
    let n = a.len();
    let (ac, ag) = p.up(&a, &[n])?;
    let (bc, bg) = p.up(&b, &[n])?;
    for shift in [-40, -31, -5, 0, 1, 8, 15, 30, 31, 32, 33, 47, 62, 63, 70] {
        let c = CpuBackend.mul_int(&ac, &bc, shift)?;
        let g = p.gpu.mul_int(&ag, &bg, shift)?;
        p.same(&format!("mul_shift by {shift}"), &c, &g).await?;
    }
    let c = CpuBackend.add_int(&ac, &bc)?;
    let g = p.gpu.add_int(&ag, &bg)?;
    p.same("add", &c, &g).await?;

    // Quantisation and the int8 linear layer: with and without bias, one scale per row or
    // per block, activation groups smaller than rows, odd row counts.
    for (m, k, n, bits, group) in [
        (1, 384, 384, 20, 384),
        (7, 384, 1536, 24, 32),
        (13, 64, 36, 31, 64),
        (5, 32, 8, 3, 32),
        (3, 576, 20, 12, 32),
    ] {
        let x = p.up(&ints(m * k, 10 + m as u64, bits), &[m, k])?;
        let q = p.quantize(&x, group).await?;
        for (bias, w_group) in [(false, k), (true, k), (true, group)] {
            let w = p.matrix(n, k, w_group, 20 + n as u64, bias)?;
            let g = p.gpu.qlinear(&q.1, &w.1)?;
            // Every CPU kernel this processor has, on the packed weights.
            let packed = CpuBackend.prepare_qmatrix(w.0.clone())?;
            for kernel in Kernel::supported_all() {
                let c = with_kernel(kernel, || CpuBackend.qlinear(&q.0, &packed))
                    .expect("a supported kernel")?;
                p.same(
                    &format!("qlinear {m}x{k}x{n} groups {group}/{w_group} ({kernel})"),
                    &c,
                    &g,
                )
                .await?;
            }
        }
    }

    // Embedding lookups.
    let table = p.matrix(50, 64, 32, 7, false)?;
    let ids = [0u32, 49, 3, 3, 17];
    let g = p.gpu.qembedding(&table.1, &ids)?;
    p.same("qembedding", &CpuBackend.qembedding(&table.0, &ids)?, &g)
        .await?;
    let packed = CpuBackend.prepare_qmatrix(table.0.clone())?;
    p.same(
        "qembedding (packed)",
        &CpuBackend.qembedding(&packed, &ids)?,
        &g,
    )
    .await?;
    let plain = p.up(&ints(50 * 8, 8, 30), &[50, 8])?;
    p.same(
        "gather",
        &CpuBackend.gather_int(&plain.0, &ids)?,
        &p.gpu.gather_int(&plain.1, &ids)?,
    )
    .await?;
    p.must_fail(
        "qembedding of a bad input",
        CpuBackend.qembedding(&table.0, &[50]),
    );
    p.must_fail(
        "qembedding of a bad input",
        p.gpu.qembedding(&table.1, &[50]),
    );

    // Norms: LayerNorm and RMSNorm over rows of very different scales, including zero rows.
    for cols in [8usize, 384, 576, 1024] {
        let mut x = Vec::new();
        for r in 0..6u32 {
            x.extend(ints(cols, 30 + r as u64, 4 + 5 * r));
        }
        x.extend(vec![0; cols]);
        x.extend(vec![12345; cols]);
        let x = p.up(&x, &[8, cols])?;
        let gamma = p.up(&ints(cols, 40, 20), &[cols])?;
        let beta = p.up(&ints(cols, 41, 18), &[cols])?;
        for frac in [12u32, 16] {
            let ln = (
                QNorm {
                    gamma: gamma.0.clone(),
                    beta: Some(beta.0.clone()),
                },
                QNorm {
                    gamma: gamma.1.clone(),
                    beta: Some(beta.1.clone()),
                },
            );
            let rms = (
                QNorm {
                    gamma: gamma.0.clone(),
                    beta: None,
                },
                QNorm {
                    gamma: gamma.1.clone(),
                    beta: None,
                },
            );
            for (what, nrm) in [("layer norm", ln), ("rms norm", rms)] {
                let c = CpuBackend.norm_int(&x.0, &nrm.0, frac)?;
                let g = p.gpu.norm_int(&x.1, &nrm.1, frac)?;
                p.same(&format!("{what} {cols} F{frac}"), &c, &g).await?;
            }
        }
    }

    // Activation tables: below, inside and above the table.
    let steps = 1024;
    let t = p.up(&ints(steps + 1, 50, 20), &[steps + 1])?;
    let lo = -(8 << 16);
    let x = p.up(&ints(5000, 51, 22), &[5000])?;
    let tables = (
        ActTable {
            table: t.0,
            len: steps,
            lo,
            step_shift: 10,
        },
        ActTable {
            table: t.1,
            len: steps,
            lo,
            step_shift: 10,
        },
    );
    p.same(
        "activation table",
        &CpuBackend.act_int(&x.0, &tables.0)?,
        &p.gpu.act_int(&x.1, &tables.1)?,
    )
    .await?;

    // Rotary embeddings.
    let (positions, hd) = (40, 64);
    let rt = p.up(&ints(positions * hd, 60, 31), &[positions * hd])?;
    let ropes = (
        RopeTable {
            table: rt.0,
            positions,
            head_dim: hd,
        },
        RopeTable {
            table: rt.1,
            positions,
            head_dim: hd,
        },
    );
    let x = p.up(&ints(5 * 3 * hd, 61, 24), &[5, 3 * hd])?;
    p.same(
        "rope",
        &CpuBackend.rope_int(&x.0, &ropes.0, 7)?,
        &p.gpu.rope_int(&x.1, &ropes.1, 7)?,
    )
    .await?;
    p.must_fail(
        "rope_int of a bad input",
        CpuBackend.rope_int(&x.0, &ropes.0, 36),
    );
    p.must_fail(
        "rope_int of a bad input",
        p.gpu.rope_int(&x.1, &ropes.1, 36),
    );

    // Attention: bidirectional with padding, causal grouped-query with an offset, and a
    // sliding window over wide heads.
    let (m, e) = split_scale(
        std::f64::consts::LOG2_E / (32f64.sqrt() * 127.0 * 127.0 * 2f64.powi(32)) * 65536.0,
    )?;
    let scale = ScoreScale { mult: m, exp: e };
    let cases = [
        AttentionParams {
            batch: 2,
            q_len: 9,
            kv_rows: 9,
            heads: 4,
            kv_heads: 4,
            head_dim: 32,
            causal: false,
            pos_offset: 0,
            window: None,
        },
        AttentionParams {
            batch: 1,
            q_len: 3,
            kv_rows: 20,
            heads: 6,
            kv_heads: 2,
            head_dim: 64,
            causal: true,
            pos_offset: 12,
            window: None,
        },
        // Gemma 3: heads of 256 values (the wide kernel), one KV head, a sliding window.
        AttentionParams {
            batch: 1,
            q_len: 3,
            kv_rows: 20,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            causal: true,
            pos_offset: 12,
            window: Some(6),
        },
    ];
    for (case, params) in cases.iter().enumerate() {
        let lens: Vec<u32> = if params.causal { vec![15] } else { vec![9, 5] };
        let qrows = params.batch * params.q_len;
        let kvrows = params.batch * params.kv_rows;
        let qw = params.heads * params.head_dim;
        let kw = params.kv_heads * params.head_dim;
        let q = p.up(&ints(qrows * qw, 70 + case as u64, 21), &[qrows, qw])?;
        let k = p.up(&ints(kvrows * kw, 71 + case as u64, 21), &[kvrows, kw])?;
        let v = p.up(&ints(kvrows * kw, 72 + case as u64, 21), &[kvrows, kw])?;
        let (qq, kq, vq) = (
            p.quantize(&q, params.head_dim).await?,
            p.quantize(&k, params.head_dim).await?,
            p.quantize(&v, params.head_dim).await?,
        );
        let c = CpuBackend.attention_int(&qq.0, &kq.0, &vq.0, &lens, params, scale)?;
        let g = p
            .gpu
            .attention_int(&qq.1, &kq.1, &vq.1, &lens, params, scale)?;
        p.same(&format!("attention case {case}"), &c, &g).await?;
    }

    // Mean pooling with padding rows.
    let x = p.up(&ints(2 * 6 * 16, 80, 28), &[12, 16])?;
    p.same(
        "mean pool",
        &CpuBackend.mean_pool_int(&x.0, 6, &[6, 2])?,
        &p.gpu.mean_pool_int(&x.1, 6, &[6, 2])?,
    )
    .await?;

    // Row copies.
    let mut dc = CpuBackend.zeros_int(&[4, 16])?;
    let mut dg = p.gpu.zeros_int(&[4, 16])?;
    let src = p.up(&ints(32, 90, 30), &[2, 16])?;
    CpuBackend.write_rows_int(&mut dc, 1, &src.0)?;
    p.gpu.write_rows_int(&mut dg, 1, &src.1)?;
    p.same("write_rows", &dc, &dg).await?;
    p.same(
        "slice_rows",
        &CpuBackend.slice_rows_int(&dc, 1, 2)?,
        &p.gpu.slice_rows_int(&dg, 1, 2)?,
    )
    .await?;
    Ok(p.diffs.into_inner())
}
