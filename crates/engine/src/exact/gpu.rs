//! Exact ops on wgpu: `exact.wgsl`, compiled on first use. Tensors are the same untyped word
//! buffers as in fast precision ([`GpuTensor`]).

use super::{
    ActTable, EXP2_NEG_Q30, ExactBackend, QActs, QMatrix, QNorm, RopeTable, ScoreScale,
    check_act_table, check_attention_int, check_norm, check_qlinear, check_qmatrix, check_quantize,
    check_rope_int,
};
use crate::{
    AttentionParams, Result, Shaped, check_pool, check_same,
    gpu::{GpuBackend, GpuTensor, grid, u32_of},
    shape_err,
};

/// The uniform block shared by every exact kernel (`Params` in exact.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: [u32; 12],
    s: [i32; 4],
}

pub(crate) struct ExactPipelines {
    quantize: wgpu::ComputePipeline,
    qlinear: wgpu::ComputePipeline,
    qembedding: wgpu::ComputePipeline,
    gather: wgpu::ComputePipeline,
    add: wgpu::ComputePipeline,
    mul: wgpu::ComputePipeline,
    norm: wgpu::ComputePipeline,
    act: wgpu::ComputePipeline,
    rope: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    /// `attention` with an accumulator for heads of up to [`MAX_HEAD_DIM`] values.
    attention_wide: wgpu::ComputePipeline,
    mean_pool: wgpu::ComputePipeline,
}

/// The widest head the exact attention kernel holds in registers.
const MAX_HEAD_DIM: usize = 256;

impl ExactPipelines {
    pub(crate) fn new(device: &wgpu::Device, packed_dot: bool) -> Self {
        let dot = if packed_dot {
            "dot4I8Packed("
        } else {
            "dot4_unpacked("
        };
        let source = include_str!("exact.wgsl").replace("DOT4(", dot);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("exact"),
            source: wgpu::ShaderSource::Wgsl(source.as_str().into()),
        });
        let wide = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("exact_wide"),
            source: wgpu::ShaderSource::Wgsl(
                source
                    .replace(
                        "array<vec4<i32>, 32>",
                        &format!("array<vec4<i32>, {}>", MAX_HEAD_DIM / 4),
                    )
                    .into(),
            ),
        });
        let pipeline_of = |module: &wgpu::ShaderModule, entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let pipeline = |entry: &str| pipeline_of(&module, entry);
        Self {
            attention_wide: pipeline_of(&wide, "attention"),
            quantize: pipeline("quantize"),
            qlinear: pipeline("qlinear"),
            qembedding: pipeline("qembedding"),
            gather: pipeline("gather"),
            add: pipeline("add"),
            mul: pipeline("mul"),
            norm: pipeline("norm"),
            act: pipeline("act"),
            rope: pipeline("rope"),
            attention: pipeline("attention"),
            mean_pool: pipeline("mean_pool"),
        }
    }
}

/// Bindings of exact.wgsl: `a`, `b`, `c`, `d` (read) and `out`.
#[derive(Default)]
struct Binds<'a> {
    a: Option<&'a wgpu::Buffer>,
    b: Option<&'a wgpu::Buffer>,
    c: Option<&'a wgpu::Buffer>,
    d: Option<&'a wgpu::Buffer>,
}

impl GpuBackend {
    /// Records one exact kernel over `threads` invocations of a 64-wide workgroup.
    fn exact_run(
        &self,
        pick: impl Fn(&ExactPipelines) -> &wgpu::ComputePipeline,
        binds: Binds<'_>,
        out: &GpuTensor,
        params: Params,
        groups: (u32, u32),
    ) {
        let pipeline = pick(self.exact_pipelines());
        let uniform = self.uniform(&params);
        let mut entries: Vec<(u32, &wgpu::Buffer)> = Vec::with_capacity(6);
        for (slot, buf) in [binds.a, binds.b, binds.c, binds.d].into_iter().enumerate() {
            if let Some(buf) = buf {
                entries.push((slot as u32, buf));
            }
        }
        entries.push((4, out.buffer()));
        entries.push((5, &uniform));
        self.dispatch_at(pipeline, &entries, (groups.0, groups.1, 1));
    }

    fn threads(n: usize) -> (u32, u32) {
        grid(n.div_ceil(64))
    }

    fn ids_buffer(&self, ids: &[u32]) -> wgpu::Buffer {
        self.u32_buffer(ids)
    }
}

fn check_ids(op: &'static str, ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(bad) => Err(shape_err(
            op,
            format!("token id {bad} outside vocabulary of {rows}"),
        )),
        None => Ok(()),
    }
}

impl ExactBackend for GpuBackend {
    fn max_int_values(&self) -> usize {
        crate::Backend::max_tensor_values(self)
    }

    type Int = GpuTensor;

    fn upload_int(&self, data: &[i32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_words(bytemuck::cast_slice(data), shape)
    }

    fn zeros_int(&self, shape: &[usize]) -> Result<GpuTensor> {
        self.tensor(shape.to_vec())
    }

    async fn read_int(&self, t: &GpuTensor) -> Result<Vec<i32>> {
        self.read_words(t).await
    }

    fn quantize(&self, x: &GpuTensor, group: usize) -> Result<QActs<GpuTensor>> {
        let (rows, cols) = check_quantize(x.shape(), group)?;
        let groups = rows * cols / group;
        let buf = self.tensor(vec![rows * cols / 4 + 2 * groups])?;
        let mut params = Params::default();
        params.n[..3].copy_from_slice(&[
            u32_of(groups, "quantize")?,
            group as u32,
            u32_of(rows * cols / 4, "quantize")?,
        ]);
        self.exact_run(
            |p| &p.quantize,
            Binds {
                a: Some(x.buffer()),
                ..Default::default()
            },
            &buf,
            params,
            Self::threads(groups),
        );
        Ok(QActs {
            rows,
            cols,
            group,
            buf,
        })
    }

    fn qlinear(&self, x: &QActs<GpuTensor>, w: &QMatrix<GpuTensor>) -> Result<GpuTensor> {
        check_qlinear(x, w)?;
        let (m, k, n) = (x.rows, x.cols, w.rows);
        let out = self.tensor(vec![m, n])?;
        let mut params = Params::default();
        params.n[..7].copy_from_slice(&[
            u32_of(m, "qlinear")?,
            u32_of(k, "qlinear")?,
            u32_of(n, "qlinear")?,
            w.bias.is_some() as u32,
            u32_of(x.scales_offset(), "qlinear")?,
            x.group as u32,
            w.group as u32,
        ]);
        let groups = (
            u32_of(n.div_ceil(32), "qlinear")?,
            u32_of(m.div_ceil(32), "qlinear")?,
        );
        self.exact_run(
            |p| &p.qlinear,
            Binds {
                a: Some(x.buf.buffer()),
                b: Some(w.data.buffer()),
                c: Some(w.requant.buffer()),
                // The kernel reads the bias only when n3 says so; bind something valid.
                d: Some(w.bias.as_ref().unwrap_or(&w.requant).buffer()),
            },
            &out,
            params,
            groups,
        );
        Ok(out)
    }

    fn qembedding(&self, table: &QMatrix<GpuTensor>, ids: &[u32]) -> Result<GpuTensor> {
        check_qmatrix("qembedding", table)?;
        check_ids("qembedding", ids, table.rows)?;
        let dim = table.cols;
        let out = self.tensor(vec![ids.len(), dim])?;
        let idx = self.ids_buffer(ids);
        let mut params = Params::default();
        params.n[..3].copy_from_slice(&[
            u32_of(ids.len(), "qembedding")?,
            dim as u32,
            table.group as u32,
        ]);
        self.exact_run(
            |p| &p.qembedding,
            Binds {
                a: Some(table.data.buffer()),
                b: Some(table.requant.buffer()),
                c: Some(&idx),
                d: None,
            },
            &out,
            params,
            Self::threads(ids.len() * dim),
        );
        Ok(out)
    }

    fn gather_int(&self, table: &GpuTensor, ids: &[u32]) -> Result<GpuTensor> {
        let (rows, dim) = table.as_matrix();
        check_ids("gather_int", ids, rows)?;
        let out = self.tensor(vec![ids.len(), dim])?;
        let idx = self.ids_buffer(ids);
        let mut params = Params::default();
        params.n[..2].copy_from_slice(&[u32_of(ids.len(), "gather_int")?, dim as u32]);
        self.exact_run(
            |p| &p.gather,
            Binds {
                a: Some(table.buffer()),
                c: Some(&idx),
                ..Default::default()
            },
            &out,
            params,
            Self::threads(ids.len() * dim),
        );
        Ok(out)
    }

    fn add_int(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        check_same("add_int", a.shape(), b.shape())?;
        self.binary(|p| &p.add, a, b, 0)
    }

    fn mul_int(&self, a: &GpuTensor, b: &GpuTensor, shift: i32) -> Result<GpuTensor> {
        check_same("mul_int", a.shape(), b.shape())?;
        self.binary(|p| &p.mul, a, b, shift)
    }

    fn norm_int(&self, x: &GpuTensor, norm: &QNorm<GpuTensor>, frac: u32) -> Result<GpuTensor> {
        let (rows, cols) = check_norm(x.shape(), norm)?;
        let out = self.tensor(x.shape().to_vec())?;
        let mut params = Params::default();
        params.n[..4].copy_from_slice(&[
            u32_of(rows, "norm_int")?,
            cols as u32,
            norm.beta.is_some() as u32,
            frac,
        ]);
        self.exact_run(
            |p| &p.norm,
            Binds {
                a: Some(x.buffer()),
                b: Some(norm.gamma.buffer()),
                c: Some(norm.beta.as_ref().unwrap_or(&norm.gamma).buffer()),
                d: None,
            },
            &out,
            params,
            Self::threads(rows),
        );
        Ok(out)
    }

    fn act_int(&self, x: &GpuTensor, table: &ActTable<GpuTensor>) -> Result<GpuTensor> {
        check_act_table(table)?;
        let n = x.numel();
        let out = self.tensor(x.shape().to_vec())?;
        let mut params = Params::default();
        params.n[..3].copy_from_slice(&[
            u32_of(n, "act_int")?,
            u32_of(table.len, "act_int")?,
            table.step_shift,
        ]);
        params.s[0] = table.lo;
        self.exact_run(
            |p| &p.act,
            Binds {
                a: Some(x.buffer()),
                b: Some(table.table.buffer()),
                ..Default::default()
            },
            &out,
            params,
            Self::threads(n),
        );
        Ok(out)
    }

    fn rope_int(
        &self,
        x: &GpuTensor,
        table: &RopeTable<GpuTensor>,
        pos_offset: usize,
    ) -> Result<GpuTensor> {
        let (rows, cols) = check_rope_int(x.shape(), table, pos_offset)?;
        let hd = table.head_dim;
        let out = self.tensor(x.shape().to_vec())?;
        let mut params = Params::default();
        params.n[..4].copy_from_slice(&[
            u32_of(rows, "rope_int")?,
            cols as u32,
            hd as u32,
            u32_of(pos_offset, "rope_int")?,
        ]);
        self.exact_run(
            |p| &p.rope,
            Binds {
                a: Some(x.buffer()),
                b: Some(table.table.buffer()),
                ..Default::default()
            },
            &out,
            params,
            Self::threads(rows * cols / 2),
        );
        Ok(out)
    }

    fn attention_int(
        &self,
        q: &QActs<GpuTensor>,
        k: &QActs<GpuTensor>,
        v: &QActs<GpuTensor>,
        kv_lens: &[u32],
        p: &AttentionParams,
        scale: ScoreScale,
    ) -> Result<GpuTensor> {
        check_attention_int(q, k, v, kv_lens, p)?;
        if p.head_dim > MAX_HEAD_DIM {
            return Err(shape_err(
                "attention_int",
                format!(
                    "head_dim {} exceeds {MAX_HEAD_DIM} on the GPU backend",
                    p.head_dim
                ),
            ));
        }
        let rows = p.batch * p.q_len;
        let out = self.tensor(vec![rows, p.heads * p.head_dim])?;
        let mut aux: Vec<i32> = EXP2_NEG_Q30.to_vec();
        aux.extend(kv_lens.iter().map(|&l| l as i32));
        let aux = self.upload_int(&aux, &[aux.len()])?;
        let op = "attention_int";
        let params = Params {
            n: [
                p.batch as u32,
                u32_of(p.q_len, op)?,
                u32_of(p.kv_rows, op)?,
                p.heads as u32,
                p.kv_heads as u32,
                p.head_dim as u32,
                p.causal as u32,
                u32_of(p.pos_offset, op)?,
                u32_of(q.scales_offset(), op)?,
                u32_of(k.scales_offset(), op)?,
                u32_of(v.scales_offset(), op)?,
                match p.window {
                    Some(w) => u32_of(w, op)?,
                    None => 0,
                },
            ],
            s: [scale.mult, scale.exp, 0, 0],
        };
        let wide = p.head_dim > 128;
        self.exact_run(
            |p| {
                if wide {
                    &p.attention_wide
                } else {
                    &p.attention
                }
            },
            Binds {
                a: Some(q.buf.buffer()),
                b: Some(k.buf.buffer()),
                c: Some(v.buf.buffer()),
                d: Some(aux.buffer()),
            },
            &out,
            params,
            Self::threads(rows * p.heads),
        );
        Ok(out)
    }

    fn write_rows_int(&self, dst: &mut GpuTensor, row: usize, src: &GpuTensor) -> Result<()> {
        self.copy_rows_into(dst, row, src)
    }

    fn slice_rows_int(&self, x: &GpuTensor, start: usize, count: usize) -> Result<GpuTensor> {
        self.copy_rows_out(x, start, count)
    }

    fn reshape_int(&self, x: &GpuTensor, shape: &[usize]) -> Result<GpuTensor> {
        x.reshaped(shape)
    }

    fn mean_pool_int(&self, x: &GpuTensor, seq: usize, lens: &[u32]) -> Result<GpuTensor> {
        let (batch, dim) = check_pool(x.shape(), seq, lens)?;
        let out = self.tensor(vec![batch, dim])?;
        let lens_buf = self.ids_buffer(lens);
        let mut params = Params::default();
        params.n[..3].copy_from_slice(&[batch as u32, dim as u32, u32_of(seq, "mean_pool_int")?]);
        self.exact_run(
            |p| &p.mean_pool,
            Binds {
                a: Some(x.buffer()),
                c: Some(&lens_buf),
                ..Default::default()
            },
            &out,
            params,
            Self::threads(batch * dim),
        );
        Ok(out)
    }
}

impl GpuBackend {
    fn binary(
        &self,
        pick: impl Fn(&ExactPipelines) -> &wgpu::ComputePipeline,
        a: &GpuTensor,
        b: &GpuTensor,
        shift: i32,
    ) -> Result<GpuTensor> {
        let n = a.numel();
        let out = self.tensor(a.shape().to_vec())?;
        let mut params = Params::default();
        params.n[0] = u32_of(n, "binary")?;
        params.s[0] = shift;
        self.exact_run(
            pick,
            Binds {
                a: Some(a.buffer()),
                b: Some(b.buffer()),
                ..Default::default()
            },
            &out,
            params,
            Self::threads(n),
        );
        Ok(out)
    }
}
