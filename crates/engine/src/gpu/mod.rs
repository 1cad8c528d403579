//! The wgpu backend: every tensor is a storage buffer, every op records one compute pass into a
//! shared command encoder, and the encoder is submitted only when the host needs data back
//! ([`Backend::read`]). Kernels are WGSL, so the same code runs on Vulkan/Metal/DX12 natively
//! and on WebGPU in a browser.

use std::sync::{Mutex, OnceLock};

use wgpu::util::DeviceExt;

use crate::{
    AttentionParams, Backend, EngineError, Result, Shaped, check_linear, check_pool, check_reshape,
    check_rope, check_same, check_slice_rows, check_write_rows, shape_err,
};

/// A device tensor: a storage buffer plus its shape. Cloning shares the buffer.
#[derive(Clone)]
pub struct GpuTensor {
    shape: Vec<usize>,
    /// wgpu buffers are reference-counted handles: cloning shares the buffer.
    buffer: wgpu::Buffer,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuTensor{:?}", self.shape)
    }
}

impl GpuTensor {
    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl GpuTensor {
    /// The same buffer (shared, not copied) under another shape with as many values.
    pub(crate) fn reshaped(&self, shape: &[usize]) -> Result<Self> {
        check_reshape(&self.shape, shape)?;
        Ok(Self {
            shape: shape.to_vec(),
            buffer: self.buffer.clone(),
        })
    }
}

impl Shaped for GpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

struct Pipelines {
    linear: wgpu::ComputePipeline,
    linear4: wgpu::ComputePipeline,
    matvec: wgpu::ComputePipeline,
    norm: wgpu::ComputePipeline,
    add: wgpu::ComputePipeline,
    gelu: wgpu::ComputePipeline,
    silu_mul: wgpu::ComputePipeline,
    gelu_tanh_mul: wgpu::ComputePipeline,
    scale: wgpu::ComputePipeline,
    embedding: wgpu::ComputePipeline,
    rope: wgpu::ComputePipeline,
    mean_pool: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    /// The same kernel with room for heads of up to 256 values (Gemma's).
    attention_wide: wgpu::ComputePipeline,
}

/// Which adapter to ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The default high-performance adapter; a software one only if nothing else exists.
    #[default]
    Any,
    /// Insist on a software (fallback) adapter, e.g. for tests.
    Fallback,
}

/// The wgpu backend.
pub struct GpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pipelines: Pipelines,
    encoder: Mutex<Option<wgpu::CommandEncoder>>,
    max_binding: u64,
    /// Whether WGSL's `dot4I8Packed` is available (it is polyfilled where the device lacks
    /// the instruction, with the same result).
    packed_dot: bool,
    /// Exact-precision kernels, compiled on first use.
    exact: OnceLock<crate::exact::gpu::ExactPipelines>,
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);
/// WebGPU caps a dispatch at 65 535 workgroups per dimension; larger grids fold into y.
const MAX_GROUPS: u32 = 65_535;

pub(crate) fn grid(groups: usize) -> (u32, u32) {
    let groups = groups.max(1) as u32;
    if groups <= MAX_GROUPS {
        (groups, 1)
    } else {
        (MAX_GROUPS, groups.div_ceil(MAX_GROUPS))
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LinearParams {
    m: u32,
    k: u32,
    n: u32,
    has_bias: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    cols: u32,
    eps: f32,
    rms: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MiscParams {
    rows: u32,
    cols: u32,
    a: u32,
    b: u32,
    f: f32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    batch: u32,
    q_len: u32,
    kv_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    causal: u32,
    pos_offset: u32,
    scale: f32,
    /// Sliding window in positions; 0 for none.
    window: u32,
    _pad: [u32; 2],
}

/// The widest attention head the kernels hold in registers.
const MAX_HEAD_DIM: usize = 256;

pub(crate) fn u32_of(v: usize, what: &'static str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| shape_err(what, format!("{v} does not fit the GPU's 32-bit indices")))
}

impl GpuBackend {
    /// The largest buffer this device allocates (the adapter's `maxBufferSize` as granted):
    /// a lower bound of what it holds, which the browser uses to cap a stage's memory.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.device.limits().max_buffer_size
    }

    /// Opens the default adapter and compiles every kernel.
    pub async fn new(choice: AdapterChoice) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: choice == AdapterChoice::Fallback,
                ..Default::default()
            })
            .await
            .map_err(|e| EngineError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let supported = adapter.limits();
        // Ask for the largest buffers the adapter allows: SmolLM2's embedding table is 113 MB.
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: supported.max_storage_buffer_binding_size,
            max_buffer_size: supported.max_buffer_size,
            max_storage_buffers_per_shader_stage: 6
                .max(wgpu::Limits::downlevel_defaults().max_storage_buffers_per_shader_stage),
            ..wgpu::Limits::downlevel_defaults()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("tabula"),
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| EngineError::Gpu(format!("request_device on {}: {e}", info.name)))?;
        tracing::info!(adapter = %info.name, backend = ?info.backend, "GPU backend ready");
        let pipelines = Pipelines::new(&device);
        let packed_dot = instance
            .wgsl_language_features()
            .contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct);
        Ok(Self {
            device,
            queue,
            info,
            pipelines,
            encoder: Mutex::new(None),
            max_binding: limits.max_storage_buffer_binding_size,
            packed_dot,
            exact: OnceLock::new(),
        })
    }

    /// Whether exact-precision kernels use WGSL's `dot4I8Packed`.
    pub fn has_packed_dot(&self) -> bool {
        self.packed_dot
    }

    /// Uses the portable int8 dot product instead of `dot4I8Packed` from now on (tests use it to
    /// check that both give the same bits).
    pub fn use_portable_dot(&mut self) {
        self.packed_dot = false;
        self.exact = OnceLock::new();
    }

    pub(crate) fn exact_pipelines(&self) -> &crate::exact::gpu::ExactPipelines {
        self.exact
            .get_or_init(|| crate::exact::gpu::ExactPipelines::new(&self.device, self.packed_dot))
    }

    /// A tensor holding `words` (4-byte values of any type).
    pub(crate) fn upload_words(&self, words: &[u32], shape: &[usize]) -> Result<GpuTensor> {
        if shape.iter().product::<usize>() != words.len() {
            return Err(shape_err(
                "upload",
                format!("{} values for shape {shape:?}", words.len()),
            ));
        }
        let out = self.tensor(shape.to_vec())?;
        if !words.is_empty() {
            self.queue
                .write_buffer(&out.buffer, 0, bytemuck::cast_slice(words));
        }
        Ok(out)
    }

    /// Copies a tensor's words back to the host: the only device-to-host transfer.
    pub(crate) async fn read_words<T: bytemuck::Pod>(&self, t: &GpuTensor) -> Result<Vec<T>> {
        let bytes = (t.numel() * 4) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.with_encoder(|encoder| {
            encoder.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, bytes)
        });
        self.flush();
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Gpu(format!("device poll: {e}")))?;
        rx.await
            .map_err(|_| EngineError::Gpu("readback was cancelled".into()))?
            .map_err(|e| EngineError::Gpu(format!("readback: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| EngineError::Gpu(format!("readback: {e}")))?;
        let out = bytemuck::cast_slice::<u8, T>(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Overwrites rows `[row, row + src.rows)` of `dst` with `src` (any word type).
    pub(crate) fn copy_rows_into(
        &self,
        dst: &mut GpuTensor,
        row: usize,
        src: &GpuTensor,
    ) -> Result<()> {
        let (n, cols) = check_write_rows(dst.shape(), row, src.shape())?;
        let bytes = (n * cols * 4) as u64;
        if bytes > 0 {
            self.with_encoder(|e| {
                e.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, (row * cols * 4) as u64, bytes)
            });
        }
        Ok(())
    }

    /// Rows `[start, start + count)` of `x` as a new tensor (any word type).
    pub(crate) fn copy_rows_out(
        &self,
        x: &GpuTensor,
        start: usize,
        count: usize,
    ) -> Result<GpuTensor> {
        let cols = check_slice_rows(x.shape(), start, count)?;
        let out = self.tensor(vec![count, cols])?;
        let bytes = (count * cols * 4) as u64;
        if bytes > 0 {
            self.with_encoder(|e| {
                e.copy_buffer_to_buffer(&x.buffer, (start * cols * 4) as u64, &out.buffer, 0, bytes)
            });
        }
        Ok(out)
    }

    /// The adapter as a volunteer would name it: its name (or "unnamed adapter" where the
    /// browser hides it), the API, and whether it is a software rasteriser.
    pub fn adapter_label(&self) -> String {
        let api = match self.info.backend {
            wgpu::Backend::BrowserWebGpu => "WebGPU",
            wgpu::Backend::Vulkan => "Vulkan",
            wgpu::Backend::Metal => "Metal",
            wgpu::Backend::Dx12 => "DirectX 12",
            wgpu::Backend::Gl => "OpenGL",
            _ => "GPU",
        };
        let name = if self.info.name.trim().is_empty() {
            "unnamed adapter"
        } else {
            self.info.name.trim()
        };
        let software = if self.is_software() { ", software" } else { "" };
        format!("{api}: {name}{software}")
    }

    /// Whether the adapter is a software implementation (lavapipe, SwiftShader).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    fn alloc(&self, values: usize) -> Result<wgpu::Buffer> {
        let bytes = (values.max(1) * 4) as u64;
        if bytes > self.max_binding {
            return Err(EngineError::Gpu(format!(
                "a tensor of {bytes} bytes exceeds this adapter's storage binding limit of {} bytes",
                self.max_binding
            )));
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: USAGE,
            mapped_at_creation: false,
        }))
    }

    pub(crate) fn tensor(&self, shape: Vec<usize>) -> Result<GpuTensor> {
        let buffer = self.alloc(shape.iter().product())?;
        Ok(GpuTensor { shape, buffer })
    }

    pub(crate) fn uniform<T: bytemuck::Pod>(&self, value: &T) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::bytes_of(value),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    pub(crate) fn u32_buffer(&self, values: &[u32]) -> wgpu::Buffer {
        let padded;
        let contents = if values.is_empty() {
            padded = [0u32];
            &padded[..]
        } else {
            values
        };
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(contents),
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    fn with_encoder(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut guard = self.encoder.lock().unwrap_or_else(|e| e.into_inner());
        let encoder =
            guard.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        f(encoder);
    }

    /// Records one dispatch of `pipeline` with `buffers` bound at bindings 0, 1, 2, …
    fn dispatch(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32, u32),
    ) {
        let numbered: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32, *b))
            .collect();
        self.dispatch_at(pipeline, &numbered, groups);
    }

    /// Like [`Self::dispatch`] with explicit binding numbers, for entry points whose derived
    /// layout omits bindings they never use.
    pub(crate) fn dispatch_at(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[(u32, &wgpu::Buffer)],
        groups: (u32, u32, u32),
    ) {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<_> = buffers
            .iter()
            .map(|&(binding, b)| wgpu::BindGroupEntry {
                binding,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        self.with_encoder(|encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        });
    }

    fn flush(&self) {
        let encoder = self
            .encoder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(encoder) = encoder {
            self.queue.submit([encoder.finish()]);
        }
    }

    fn elementwise(
        &self,
        pipeline: &wgpu::ComputePipeline,
        a: &GpuTensor,
        b: Option<&GpuTensor>,
    ) -> Result<GpuTensor> {
        self.elementwise_with(pipeline, a, b, 0.0)
    }

    /// [`Self::elementwise`] with a scalar operand `f` (the kernel's `p.f`).
    fn elementwise_with(
        &self,
        pipeline: &wgpu::ComputePipeline,
        a: &GpuTensor,
        b: Option<&GpuTensor>,
        f: f32,
    ) -> Result<GpuTensor> {
        let out = self.tensor(a.shape.clone())?;
        let n = a.numel();
        let params = self.uniform(&[u32_of(n, "elementwise")?, f.to_bits(), 0, 0]);
        let (x, y) = grid(n.div_ceil(256));
        match b {
            Some(b) => self.dispatch(
                pipeline,
                &[&a.buffer, &b.buffer, &out.buffer, &params],
                (x, y, 1),
            ),
            // Entry points that ignore `b` get a layout without binding 1.
            None => self.dispatch_at(
                pipeline,
                &[(0, &a.buffer), (2, &out.buffer), (3, &params)],
                (x, y, 1),
            ),
        }
        Ok(out)
    }

    /// LayerNorm (with `beta`) or RMSNorm (without) through the shared `norm.wgsl` kernel.
    fn norm(
        &self,
        op: &'static str,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: Option<&GpuTensor>,
        eps: f32,
    ) -> Result<GpuTensor> {
        let (rows, cols) = x.as_matrix();
        check_same(op, &gamma.shape, &[cols])?;
        if let Some(beta) = beta {
            check_same(op, &beta.shape, &[cols])?;
        }
        let out = self.tensor(x.shape.clone())?;
        let params = self.uniform(&NormParams {
            rows: u32_of(rows, op)?,
            cols: cols as u32,
            eps,
            rms: beta.is_none() as u32,
        });
        let (gx, gy) = grid(rows.div_ceil(64));
        // The kernel declares beta even for RMSNorm, where it never reads it.
        let beta = beta.unwrap_or(gamma);
        self.dispatch(
            &self.pipelines.norm,
            &[&x.buffer, &gamma.buffer, &beta.buffer, &out.buffer, &params],
            (gx, gy, 1),
        );
        Ok(out)
    }

    /// A `misc.wgsl` entry point; `idx` is `None` for those that declare no index buffer.
    fn misc(
        &self,
        pipeline: &wgpu::ComputePipeline,
        src: &GpuTensor,
        idx: Option<&[u32]>,
        out: GpuTensor,
        params: MiscParams,
        threads: usize,
    ) -> Result<GpuTensor> {
        let params = self.uniform(&params);
        let (x, y) = grid(threads.div_ceil(256));
        match idx {
            Some(idx) => {
                let idx = self.u32_buffer(idx);
                self.dispatch(
                    pipeline,
                    &[&src.buffer, &idx, &out.buffer, &params],
                    (x, y, 1),
                );
            }
            None => self.dispatch_at(
                pipeline,
                &[(0, &src.buffer), (2, &out.buffer), (3, &params)],
                (x, y, 1),
            ),
        }
        Ok(out)
    }
}

impl Pipelines {
    fn new(device: &wgpu::Device) -> Self {
        let module = |label: &str, src: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
        };
        let pipeline = |module: &wgpu::ShaderModule, entry: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let linear = module("linear", include_str!("linear.wgsl"));
        let linear4 = module("linear4", include_str!("linear4.wgsl"));
        let matvec = module("matvec", include_str!("matvec.wgsl"));
        let norm = module("norm", include_str!("norm.wgsl"));
        let elementwise = module("elementwise", include_str!("elementwise.wgsl"));
        let misc = module("misc", include_str!("misc.wgsl"));
        let attention = module("attention", include_str!("attention.wgsl"));
        let attention_wide = module(
            "attention_wide",
            &include_str!("attention.wgsl").replace(
                "array<vec4<f32>, 32>",
                &format!("array<vec4<f32>, {}>", MAX_HEAD_DIM / 4),
            ),
        );
        Self {
            linear: pipeline(&linear, "main"),
            linear4: pipeline(&linear4, "main"),
            matvec: pipeline(&matvec, "main"),
            norm: pipeline(&norm, "main"),
            add: pipeline(&elementwise, "add"),
            gelu: pipeline(&elementwise, "gelu"),
            silu_mul: pipeline(&elementwise, "silu_mul"),
            gelu_tanh_mul: pipeline(&elementwise, "gelu_tanh_mul"),
            scale: pipeline(&elementwise, "scale"),
            embedding: pipeline(&misc, "embedding"),
            rope: pipeline(&misc, "rope"),
            mean_pool: pipeline(&misc, "mean_pool"),
            attention: pipeline(&attention, "main"),
            attention_wide: pipeline(&attention_wide, "main"),
        }
    }
}

impl Backend for GpuBackend {
    type Tensor = GpuTensor;

    fn describe(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    fn max_tensor_values(&self) -> usize {
        usize::try_from(self.max_binding / 4).unwrap_or(usize::MAX)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        self.upload_words(bytemuck::cast_slice(data), shape)
    }

    fn zeros(&self, shape: &[usize]) -> Result<GpuTensor> {
        // New buffers are zero-initialised by wgpu.
        self.tensor(shape.to_vec())
    }

    async fn read(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        self.read_words(t).await
    }

    fn linear(&self, x: &GpuTensor, w: &GpuTensor, b: Option<&GpuTensor>) -> Result<GpuTensor> {
        let (m, k, n) = check_linear(&x.shape, &w.shape, b.map(|b| b.shape()))?;
        let out = self.tensor(vec![m, n])?;
        let params = self.uniform(&LinearParams {
            m: u32_of(m, "linear")?,
            k: u32_of(k, "linear")?,
            n: u32_of(n, "linear")?,
            has_bias: b.is_some() as u32,
        });
        // Binding 2 must be bound even without a bias; the kernel never reads it then.
        let bias = b.map_or(&w.buffer, |b| &b.buffer);
        if m <= 4 {
            let (gx, gy) = grid(n);
            self.dispatch(
                &self.pipelines.matvec,
                &[&x.buffer, &w.buffer, bias, &out.buffer, &params],
                (gx, gy, m as u32),
            );
        } else if k % 4 == 0 {
            let groups = (
                u32_of(n.div_ceil(32), "linear")?,
                u32_of(m.div_ceil(32), "linear")?,
                1,
            );
            self.dispatch(
                &self.pipelines.linear4,
                &[&x.buffer, &w.buffer, bias, &out.buffer, &params],
                groups,
            );
        } else {
            let groups = (n.div_ceil(64) as u32, u32_of(m.div_ceil(64), "linear")?, 1);
            self.dispatch(
                &self.pipelines.linear,
                &[&x.buffer, &w.buffer, bias, &out.buffer, &params],
                groups,
            );
        }
        Ok(out)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        check_same("add", &a.shape, &b.shape)?;
        self.elementwise(&self.pipelines.add, a, Some(b))
    }

    fn layer_norm(
        &self,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        eps: f32,
    ) -> Result<GpuTensor> {
        self.norm("layer_norm", x, gamma, Some(beta), eps)
    }

    fn rms_norm(&self, x: &GpuTensor, gamma: &GpuTensor, eps: f32) -> Result<GpuTensor> {
        self.norm("rms_norm", x, gamma, None, eps)
    }

    fn gelu(&self, x: &GpuTensor) -> Result<GpuTensor> {
        self.elementwise(&self.pipelines.gelu, x, None)
    }

    fn silu_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> Result<GpuTensor> {
        check_same("silu_mul", &gate.shape, &up.shape)?;
        self.elementwise(&self.pipelines.silu_mul, gate, Some(up))
    }

    fn gelu_tanh_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> Result<GpuTensor> {
        check_same("gelu_tanh_mul", &gate.shape, &up.shape)?;
        self.elementwise(&self.pipelines.gelu_tanh_mul, gate, Some(up))
    }

    fn scale(&self, x: &GpuTensor, s: f32) -> Result<GpuTensor> {
        self.elementwise_with(&self.pipelines.scale, x, None, s)
    }

    fn reshape(&self, x: &GpuTensor, shape: &[usize]) -> Result<GpuTensor> {
        x.reshaped(shape)
    }

    fn embedding(&self, table: &GpuTensor, ids: &[u32]) -> Result<GpuTensor> {
        let (vocab, dim) = table.as_matrix();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(shape_err(
                "embedding",
                format!("token id {bad} outside vocabulary of {vocab}"),
            ));
        }
        let out = self.tensor(vec![ids.len(), dim])?;
        let params = MiscParams {
            rows: u32_of(ids.len(), "embedding")?,
            cols: dim as u32,
            a: 0,
            b: 0,
            f: 0.0,
            _pad: [0; 3],
        };
        self.misc(
            &self.pipelines.embedding,
            table,
            Some(ids),
            out,
            params,
            ids.len() * dim,
        )
    }

    fn rope(
        &self,
        x: &GpuTensor,
        head_dim: usize,
        pos_offset: usize,
        freqs: &[f32],
    ) -> Result<GpuTensor> {
        check_rope(&x.shape, head_dim, freqs)?;
        let (rows, cols) = x.as_matrix();
        let out = self.tensor(x.shape.clone())?;
        let params = MiscParams {
            rows: u32_of(rows, "rope")?,
            cols: cols as u32,
            a: head_dim as u32,
            b: u32_of(pos_offset, "rope")?,
            f: 0.0,
            _pad: [0; 3],
        };
        // The frequencies travel as the index binding's words (f32 bits).
        let bits: Vec<u32> = freqs.iter().map(|f| f.to_bits()).collect();
        self.misc(
            &self.pipelines.rope,
            x,
            Some(&bits),
            out,
            params,
            rows * cols / 2,
        )
    }

    fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        kv_lens: &[u32],
        p: &AttentionParams,
    ) -> Result<GpuTensor> {
        p.validate(&q.shape, &k.shape, &v.shape, kv_lens)?;
        if p.head_dim > MAX_HEAD_DIM || !p.head_dim.is_multiple_of(4) {
            return Err(shape_err(
                "attention",
                format!(
                    "head_dim {} must be a multiple of 4 up to {MAX_HEAD_DIM} on the GPU backend",
                    p.head_dim
                ),
            ));
        }
        let rows = p.batch * p.q_len;
        let out = self.tensor(vec![rows, p.heads * p.head_dim])?;
        let params = self.uniform(&AttnParams {
            batch: p.batch as u32,
            q_len: p.q_len as u32,
            kv_rows: u32_of(p.kv_rows, "attention")?,
            heads: p.heads as u32,
            kv_heads: p.kv_heads as u32,
            head_dim: p.head_dim as u32,
            causal: p.causal as u32,
            pos_offset: u32_of(p.pos_offset, "attention")?,
            scale: 1.0 / (p.head_dim as f32).sqrt(),
            window: match p.window {
                Some(w) => u32_of(w, "attention")?,
                None => 0,
            },
            _pad: [0; 2],
        });
        let lens = self.u32_buffer(kv_lens);
        let (gx, gy) = grid((rows * p.heads).div_ceil(64));
        // Wide heads need twice the accumulator registers: only they pay for them.
        let pipeline = if p.head_dim > 128 {
            &self.pipelines.attention_wide
        } else {
            &self.pipelines.attention
        };
        self.dispatch(
            pipeline,
            &[&q.buffer, &k.buffer, &v.buffer, &lens, &out.buffer, &params],
            (gx, gy, 1),
        );
        Ok(out)
    }

    fn write_rows(&self, dst: &mut GpuTensor, row: usize, src: &GpuTensor) -> Result<()> {
        self.copy_rows_into(dst, row, src)
    }

    fn slice_rows(&self, x: &GpuTensor, start: usize, count: usize) -> Result<GpuTensor> {
        self.copy_rows_out(x, start, count)
    }

    fn mean_pool(&self, x: &GpuTensor, seq: usize, lens: &[u32]) -> Result<GpuTensor> {
        let (batch, dim) = check_pool(&x.shape, seq, lens)?;
        let out = self.tensor(vec![batch, dim])?;
        let params = MiscParams {
            rows: batch as u32,
            cols: dim as u32,
            a: u32_of(seq, "mean_pool")?,
            b: 0,
            f: 0.0,
            _pad: [0; 3],
        };
        self.misc(
            &self.pipelines.mean_pool,
            x,
            Some(lens),
            out,
            params,
            batch * dim,
        )
    }
}
