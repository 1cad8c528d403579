//! Every op of the wgpu backend against the CPU reference on pseudo-random data.
//! Needs a GPU adapter; CI provides lavapipe (mesa-vulkan-drivers). No adapter is a failure,
//! not a skip.

use tabula_engine::{
    AttentionParams, Backend, Shaped,
    cpu::CpuBackend,
    gpu::{AdapterChoice, GpuBackend},
};

fn gpu() -> GpuBackend {
    pollster::block_on(GpuBackend::new(AdapterChoice::Any))
        .expect("a GPU adapter (install mesa-vulkan-drivers)")
}

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Pair {
    gpu: GpuBackend,
}

impl Pair {
    fn both(
        &self,
        data: &[f32],
        shape: &[usize],
    ) -> (
        <CpuBackend as Backend>::Tensor,
        <GpuBackend as Backend>::Tensor,
    ) {
        (
            CpuBackend.upload(data, shape).unwrap(),
            self.gpu.upload(data, shape).unwrap(),
        )
    }
    fn check(
        &self,
        what: &str,
        c: &<CpuBackend as Backend>::Tensor,
        g: &<GpuBackend as Backend>::Tensor,
        tol: f32,
    ) {
        assert_eq!(c.shape(), g.shape(), "{what}: shapes");
        let g = pollster::block_on(self.gpu.read(g)).unwrap();
        let c = c.data();
        let worst = c
            .iter()
            .zip(&g)
            .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
            .fold(0.0f32, f32::max);
        assert!(
            worst <= tol,
            "{what}: worst relative difference {worst} > {tol}"
        );
    }
}

#[test]
fn every_op_matches_cpu() {
    let p = Pair { gpu: gpu() };
    let cpu = CpuBackend;
    for (m, k, n) in [(1, 64, 70), (3, 576, 192), (37, 384, 1536), (130, 100, 65)] {
        let (xc, xg) = p.both(&noise(m * k, 1), &[m, k]);
        let (wc, wg) = p.both(&noise(n * k, 2), &[n, k]);
        let (bc, bg) = p.both(&noise(n, 3), &[n]);
        p.check(
            "linear+bias",
            &cpu.linear(&xc, &wc, Some(&bc)).unwrap(),
            &p.gpu.linear(&xg, &wg, Some(&bg)).unwrap(),
            1e-5,
        );
        p.check(
            "linear",
            &cpu.linear(&xc, &wc, None).unwrap(),
            &p.gpu.linear(&xg, &wg, None).unwrap(),
            1e-5,
        );
    }
    let (xc, xg) = p.both(&noise(5 * 384, 4), &[5, 384]);
    let (yc, yg) = p.both(&noise(5 * 384, 5), &[5, 384]);
    let (gc, gg) = p.both(&noise(384, 6), &[384]);
    let (bc, bg) = p.both(&noise(384, 7), &[384]);
    p.check(
        "add",
        &cpu.add(&xc, &yc).unwrap(),
        &p.gpu.add(&xg, &yg).unwrap(),
        1e-6,
    );
    p.check(
        "gelu",
        &cpu.gelu(&xc).unwrap(),
        &p.gpu.gelu(&xg).unwrap(),
        1e-6,
    );
    p.check(
        "silu_mul",
        &cpu.silu_mul(&xc, &yc).unwrap(),
        &p.gpu.silu_mul(&xg, &yg).unwrap(),
        1e-6,
    );
    p.check(
        "gelu_tanh_mul",
        &cpu.gelu_tanh_mul(&xc, &yc).unwrap(),
        &p.gpu.gelu_tanh_mul(&xg, &yg).unwrap(),
        1e-6,
    );
    p.check(
        "scale",
        &cpu.scale(&xc, 25.3).unwrap(),
        &p.gpu.scale(&xg, 25.3).unwrap(),
        0.0,
    );
    // One RMSNorm per 4-value head of the same values.
    p.check(
        "reshape + rms_norm per head",
        &cpu.reshape(
            &cpu.rms_norm(
                &cpu.reshape(&xc, &[xc.numel() / 4, 4]).unwrap(),
                &cpu.upload(&[1.0, 2.0, 0.5, -1.0], &[4]).unwrap(),
                1e-6,
            )
            .unwrap(),
            xc.shape(),
        )
        .unwrap(),
        &p.gpu
            .reshape(
                &p.gpu
                    .rms_norm(
                        &p.gpu.reshape(&xg, &[xg.numel() / 4, 4]).unwrap(),
                        &p.gpu.upload(&[1.0, 2.0, 0.5, -1.0], &[4]).unwrap(),
                        1e-6,
                    )
                    .unwrap(),
                xg.shape(),
            )
            .unwrap(),
        1e-5,
    );
    assert!(cpu.reshape(&xc, &[7, 3]).is_err() && p.gpu.reshape(&xg, &[7, 3]).is_err());
    p.check(
        "layer_norm",
        &cpu.layer_norm(&xc, &gc, &bc, 1e-12).unwrap(),
        &p.gpu.layer_norm(&xg, &gg, &bg, 1e-12).unwrap(),
        1e-5,
    );
    p.check(
        "rms_norm",
        &cpu.rms_norm(&xc, &gc, 1e-5).unwrap(),
        &p.gpu.rms_norm(&xg, &gg, 1e-5).unwrap(),
        1e-5,
    );
    // Scaled as Llama 3.1 does: a divisor per pair.
    let factors: Vec<f32> = (0..32).map(|i| 1.0 + i as f32 / 4.0).collect();
    let freqs: Vec<f32> = tabula_engine::rope_freqs(100_000.0, 64, Some(&factors))
        .into_iter()
        .map(|f| f as f32)
        .collect();
    p.check(
        "rope",
        &cpu.rope(&xc, 64, 7, &freqs).unwrap(),
        &p.gpu.rope(&xg, 64, 7, &freqs).unwrap(),
        1e-5,
    );
    p.check(
        "embedding",
        &cpu.embedding(&xc, &[4, 0, 2]).unwrap(),
        &p.gpu.embedding(&xg, &[4, 0, 2]).unwrap(),
        0.0,
    );
    assert!(
        p.gpu.embedding(&xg, &[5]).is_err(),
        "out-of-vocabulary id must be rejected"
    );
    p.check(
        "slice_rows",
        &cpu.slice_rows(&xc, 1, 3).unwrap(),
        &p.gpu.slice_rows(&xg, 1, 3).unwrap(),
        0.0,
    );
    p.check(
        "mean_pool",
        &cpu.mean_pool(&xc, 5, &[3]).unwrap(),
        &p.gpu.mean_pool(&xg, 5, &[3]).unwrap(),
        1e-6,
    );

    // Attention: padded batch (BERT) and causal GQA with an offset (Llama decoding), including
    // more than one 128-key chunk.
    for params in [
        AttentionParams {
            batch: 3,
            q_len: 20,
            kv_rows: 20,
            heads: 12,
            kv_heads: 12,
            head_dim: 32,
            causal: false,
            pos_offset: 0,
            window: None,
        },
        AttentionParams {
            batch: 1,
            q_len: 4,
            kv_rows: 300,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            causal: true,
            pos_offset: 196,
            window: None,
        },
        AttentionParams {
            batch: 1,
            q_len: 150,
            kv_rows: 160,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            causal: true,
            pos_offset: 0,
            window: None,
        },
        // Gemma 3: heads of 256 values (the wide kernel), one KV head, a sliding window that
        // hides most of the prompt from its last queries, and one decoding step past it.
        AttentionParams {
            batch: 1,
            q_len: 40,
            kv_rows: 48,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            causal: true,
            pos_offset: 0,
            window: Some(12),
        },
        AttentionParams {
            batch: 1,
            q_len: 1,
            kv_rows: 48,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            causal: true,
            pos_offset: 40,
            window: Some(12),
        },
    ] {
        let lens: Vec<u32> = if params.causal {
            vec![(params.pos_offset + params.q_len) as u32]
        } else {
            vec![20, 7, 1]
        };
        let qn = params.batch * params.q_len * params.heads * params.head_dim;
        let kvn = params.batch * params.kv_rows * params.kv_heads * params.head_dim;
        let (qc, qg) = p.both(
            &noise(qn, 8),
            &[params.batch * params.q_len, params.heads * params.head_dim],
        );
        let kv_shape = [
            params.batch * params.kv_rows,
            params.kv_heads * params.head_dim,
        ];
        let (kc, kg) = p.both(&noise(kvn, 9), &kv_shape);
        let (vc, vg) = p.both(&noise(kvn, 10), &kv_shape);
        p.check(
            &format!("attention {params:?}"),
            &cpu.attention(&qc, &kc, &vc, &lens, &params).unwrap(),
            &p.gpu.attention(&qg, &kg, &vg, &lens, &params).unwrap(),
            1e-5,
        );
    }

    let (mut dc, mut dg) = p.both(&noise(6 * 4, 11), &[6, 4]);
    let (sc, sg) = p.both(&noise(2 * 4, 12), &[2, 4]);
    cpu.write_rows(&mut dc, 3, &sc).unwrap();
    p.gpu.write_rows(&mut dg, 3, &sg).unwrap();
    p.check("write_rows", &dc, &dg, 0.0);
    assert!(p.gpu.write_rows(&mut dg, 5, &sg).is_err());
}
