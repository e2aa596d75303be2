//! The backend proper (built with the `wgpu` feature).

use crate::wgsl;

use parking_lot::Mutex;
use sluice_core::ops::{Rope, RopeStyle};
use sluice_core::{AttnParams, Backend, DType, Error, Result, WeightView};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use wgpu::util::DeviceExt;

/// Environment variable that turns a missing adapter into a test failure
/// (set in CI, where lavapipe must be present).
pub const REQUIRE_ENV: &str = "SLUICE_REQUIRE_GPU";

/// Options of [`WgpuBackend::new`].
#[derive(Clone, Debug)]
pub struct WgpuOptions {
    /// Workgroup size of the kernels (a power of two, 1..=256); `None`
    /// picks per adapter: 8 on CPU adapters such as lavapipe, the subgroup
    /// width (32 on Apple GPUs) or 64 elsewhere.
    pub workgroup: Option<u32>,
    /// Bytes of resident weights kept on the device; beyond it weights are
    /// uploaded per use.
    pub resident_budget: u64,
    /// Use subgroup operations when the adapter offers them.
    pub subgroups: bool,
    /// Use native f16 when the adapter offers it.
    pub f16: bool,
    /// Single-token products with this many output rows per invocation
    /// (`Some(0)`: one row per workgroup); `None` picks per adapter:
    /// [`wgsl::cpu_rows_per_invocation`] on CPU adapters such as lavapipe
    /// (by Mesa version), a workgroup per row elsewhere.
    pub rows_per_invocation: Option<u32>,
    /// Caps the storage binding size below the adapter's (tests use it to
    /// exercise the splitting on small matrices).
    pub max_binding: Option<u64>,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            workgroup: None,
            resident_budget: 1 << 30,
            subgroups: true,
            f16: true,
            max_binding: None,
            rows_per_invocation: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kernel {
    Matmul(DType),
    Matvec(DType),
    RmsNorm,
    Swiglu,
    Rope,
    Route,
    Attention,
}

/// A weight matrix on the device, split into row ranges that each fit one
/// binding.
struct GpuWeight {
    chunks: Vec<Chunk>,
    bytes: u64,
}

struct Chunk {
    r0: usize,
    rows: usize,
    w: wgpu::Buffer,
    aux: Option<[wgpu::Buffer; 2]>,
}

#[derive(Default)]
struct State {
    pipelines: HashMap<Kernel, Arc<wgpu::ComputePipeline>>,
    resident: HashMap<u64, Arc<GpuWeight>>,
    resident_bytes: u64,
}

/// The wgpu backend.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    wg: u32,
    subgroups: bool,
    f16: bool,
    mappable: bool,
    unified: bool,
    budget: u64,
    binding_cap: u64,
    /// Rows per invocation of the decode matvec; 0: a workgroup per row.
    rows_per_lane: u32,
    mm_layout: wgpu::BindGroupLayout,
    ops_layout: wgpu::BindGroupLayout,
    dummy: wgpu::Buffer,
    /// Bound to the writable slots a kernel does not use.
    dummy_rw: wgpu::Buffer,
    state: Mutex<State>,
    gpu_ns: AtomicU64,
    uploaded: AtomicU64,
    errors: Arc<Mutex<Option<String>>>,
}

fn gpu_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unsupported(format!("GPU backend: {what}: {e}"))
}

impl WgpuBackend {
    /// Opens the first adapter wgpu finds (Metal on Apple platforms, else
    /// Vulkan), preferring a discrete or integrated GPU to a CPU adapter.
    /// Fails with a clear message when there is none.
    pub fn new(opts: &WgpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::METAL | wgpu::Backends::VULKAN,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| {
            Error::Unsupported(format!(
                "no GPU adapter (Metal or Vulkan) found: {e}; on Linux install a Vulkan driver, e.g. Mesa's lavapipe (apt-get install mesa-vulkan-drivers libvulkan1)"
            ))
        })?;
        let info = adapter.get_info();
        let have = adapter.features();
        let mut want = wgpu::Features::empty();
        let subgroups = opts.subgroups && have.contains(wgpu::Features::SUBGROUP);
        if subgroups {
            want |= wgpu::Features::SUBGROUP;
        }
        let f16 = opts.f16 && have.contains(wgpu::Features::SHADER_F16);
        if f16 {
            want |= wgpu::Features::SHADER_F16;
        }
        // Mapped storage buffers only pay where host and device share memory.
        let unified = matches!(
            info.device_type,
            wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::Cpu
        ) || info.backend == wgpu::Backend::Metal;
        let mappable = unified && have.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        if mappable {
            want |= wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        let alimits = adapter.limits();
        let mut limits = wgpu::Limits::default().using_resolution(alimits.clone());
        limits.max_storage_buffer_binding_size = alimits.max_storage_buffer_binding_size;
        limits.max_buffer_size = alimits.max_buffer_size;
        limits.max_storage_buffers_per_shader_stage =
            alimits.max_storage_buffers_per_shader_stage.min(8);
        limits.max_compute_workgroup_storage_size = alimits.max_compute_workgroup_storage_size;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sluice"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| gpu_err(&format!("cannot open {}", info.name), e))?;
        let errors: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().get_or_insert_with(|| e.to_string());
        }));
        let limits = device.limits();
        let wg = match opts.workgroup {
            Some(w) => {
                if !w.is_power_of_two() || w > wgsl::MAX_WG {
                    return Err(Error::Invalid(format!(
                        "GPU workgroup size {w} must be a power of two up to {}",
                        wgsl::MAX_WG
                    )));
                }
                w
            }
            None if info.device_type == wgpu::DeviceType::Cpu => 8,
            None if subgroups && adapter.get_info().subgroup_max_size >= 8 => {
                adapter.get_info().subgroup_max_size.min(wgsl::MAX_WG)
            }
            None => 64,
        }
        .min(limits.max_compute_invocations_per_workgroup)
        .min(limits.max_compute_workgroup_size_x);
        let entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let ro = wgpu::BufferBindingType::Storage { read_only: true };
        let rw = wgpu::BufferBindingType::Storage { read_only: false };
        let un = wgpu::BufferBindingType::Uniform;
        let mm_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("matmul"),
            entries: &[
                entry(0, ro),
                entry(1, ro),
                entry(2, rw),
                entry(3, un),
                entry(4, ro),
                entry(5, ro),
            ],
        });
        let ops_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("ops"),
            entries: &[
                entry(0, rw),
                entry(1, ro),
                entry(2, ro),
                entry(3, un),
                entry(4, rw),
                entry(5, rw),
            ],
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let dummy_rw = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy_rw"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let rows_per_lane =
            opts.rows_per_invocation
                .unwrap_or(if info.device_type == wgpu::DeviceType::Cpu {
                    wgsl::cpu_rows_per_invocation(&info.driver_info)
                } else {
                    0
                });
        Ok(WgpuBackend {
            device,
            queue,
            info,
            limits,
            wg,
            subgroups,
            f16,
            mappable,
            unified,
            budget: opts.resident_budget,
            binding_cap: opts.max_binding.unwrap_or(u64::MAX).max(256),
            rows_per_lane,
            mm_layout,
            ops_layout,
            dummy,
            dummy_rw,
            state: Mutex::new(State::default()),
            gpu_ns: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            errors,
        })
    }

    /// Whether the adapter's memory is the host's RAM (Apple GPUs,
    /// integrated GPUs, CPU adapters): its resident copies then count
    /// against a RAM cap.
    pub fn shares_host_memory(&self) -> bool {
        self.unified
    }

    /// Bytes of resident weights it keeps on the device at most.
    pub fn resident_budget(&self) -> u64 {
        self.budget
    }

    /// One line for the user: adapter, API, workgroup size and the
    /// optional features in use.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {}): workgroup {}, subgroups {}, f16 {}, {} uploads, max binding {} MiB, decode {}",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info,
            self.wg,
            if self.subgroups { "on" } else { "off" },
            if self.f16 { "on" } else { "off" },
            if self.mappable { "mapped (one copy)" } else { "staged" },
            self.max_binding() >> 20,
            match self.rows_per_lane {
                0 => "a row per workgroup".to_string(),
                n => format!("{n} rows per invocation"),
            }
        )
    }

    /// Whether the adapter is a CPU implementation (lavapipe, SwiftShader).
    pub fn is_cpu_adapter(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The workgroup size the kernels run with.
    pub fn workgroup(&self) -> u32 {
        self.wg
    }

    /// Bytes of weights copied to the device so far.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Bytes of resident weights held on the device.
    pub fn resident_bytes(&self) -> u64 {
        self.state.lock().resident_bytes
    }

    fn max_binding(&self) -> u64 {
        (self.limits.max_storage_buffer_binding_size)
            .min(self.limits.max_buffer_size)
            .min(self.binding_cap)
            .min(1 << 31)
    }

    fn pipeline(&self, k: Kernel) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.state.lock().pipelines.get(&k) {
            return Ok(p.clone());
        }
        let (src, entry, layout) = match k {
            Kernel::Matmul(dt) => (
                wgsl::matmul(dt, self.subgroups, self.f16),
                "main",
                &self.mm_layout,
            ),
            Kernel::Matvec(dt) => (
                wgsl::matvec(dt, self.subgroups, self.rows_per_lane),
                "main",
                &self.mm_layout,
            ),
            Kernel::RmsNorm => (wgsl::OPS.to_string(), "rms_norm", &self.ops_layout),
            Kernel::Swiglu => (wgsl::OPS.to_string(), "swiglu", &self.ops_layout),
            Kernel::Rope => (wgsl::OPS.to_string(), "rope", &self.ops_layout),
            Kernel::Route => (wgsl::OPS.to_string(), "route", &self.ops_layout),
            Kernel::Attention => (wgsl::OPS.to_string(), "attention", &self.ops_layout),
        };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(entry),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(entry),
                bind_group_layouts: &[Some(layout)],
                immediate_size: 0,
            });
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[("WG", self.wg as f64)],
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err(&format!("kernel {entry} for {k:?}"), e));
        }
        let p = Arc::new(p);
        self.state.lock().pipelines.insert(k, p.clone());
        Ok(p)
    }

    /// A storage buffer holding `bytes` (padded to whole words), written
    /// with one copy: into memory mapped at creation.
    fn upload(&self, bytes: &[u8], extra: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let size = (bytes.len().max(4) as u64).next_multiple_of(4);
        let mut usage = wgpu::BufferUsages::STORAGE | extra;
        if self.mappable && extra.is_empty() {
            usage |= wgpu::BufferUsages::MAP_WRITE;
        }
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: true,
        });
        {
            let mut m = buf
                .get_mapped_range_mut(..)
                .map_err(|e| gpu_err("mapping an upload buffer", e))?;
            m.slice(..bytes.len()).copy_from_slice(bytes);
            m.slice(bytes.len()..).fill(0);
        }
        buf.unmap();
        self.check()?;
        Ok(buf)
    }

    /// The first device error since the last check (wgpu reports them
    /// asynchronously to a handler, which would otherwise panic).
    fn check(&self) -> Result<()> {
        match self.errors.lock().take() {
            Some(e) => Err(gpu_err("device error", e)),
            None => Ok(()),
        }
    }

    fn upload_f32(&self, v: &[f32], extra: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        self.upload(bytemuck::cast_slice(v), extra)
    }

    fn scratch(&self, bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(4).next_multiple_of(4),
            usage,
            mapped_at_creation: false,
        })
    }

    /// Splits `w` into row ranges of at most one binding each and uploads
    /// them.
    fn to_device(&self, w: &WeightView<'_>) -> Result<GpuWeight> {
        // Every slice below stays in bounds.
        w.check()?;
        let rb = w.row_bytes();
        let ab = match w.dtype {
            DType::Mlx(q) => q.aux_row_bytes(w.cols),
            _ => 0,
        };
        let max = self.max_binding() as usize;
        if rb > max || rb == 0 && w.rows > 0 {
            return Err(Error::Unsupported(format!(
                "GPU backend: a row of {} bytes exceeds the adapter's {} MiB binding limit",
                rb,
                max >> 20
            )));
        }
        let per = (max / rb.max(1)).clamp(1, w.rows.max(1));
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < w.rows {
            let rows = per.min(w.rows - r0);
            let buf = self.upload(
                &w.data[r0 * rb..(r0 + rows) * rb],
                wgpu::BufferUsages::empty(),
            )?;
            let aux = if let DType::FP8(q) = w.dtype {
                // One f32 scale line per row: the shader then indexes
                // scales as it does MLX's.
                let mut s = Vec::with_capacity(rows * q.scale_cols(w.cols));
                for r in r0..r0 + rows {
                    sluice_core::fp8::line_f32(q, w.fp8_scale_line(q, r), &mut s);
                }
                Some([
                    self.upload_f32(&s, wgpu::BufferUsages::empty())?,
                    self.upload(&[], wgpu::BufferUsages::empty())?,
                ])
            } else if ab > 0 {
                Some([
                    self.upload(
                        &w.scales[r0 * ab..(r0 + rows) * ab],
                        wgpu::BufferUsages::empty(),
                    )?,
                    self.upload(
                        &w.biases[r0 * ab..(r0 + rows) * ab],
                        wgpu::BufferUsages::empty(),
                    )?,
                ])
            } else {
                None
            };
            chunks.push(Chunk {
                r0,
                rows,
                w: buf,
                aux,
            });
            r0 += rows;
        }
        let bytes = (w.data.len() + w.scales.len() + w.biases.len()) as u64;
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
        Ok(GpuWeight { chunks, bytes })
    }

    /// The device copy of `w`: the kept one for a resident weight, else a
    /// fresh upload (kept when it has an id and the budget allows).
    fn weight(&self, w: &WeightView<'_>) -> Result<Arc<GpuWeight>> {
        if let Some(id) = w.id {
            if let Some(g) = self.state.lock().resident.get(&id) {
                return Ok(g.clone());
            }
        }
        let g = Arc::new(self.to_device(w)?);
        if let Some(id) = w.id {
            let mut st = self.state.lock();
            if st.resident_bytes + g.bytes <= self.budget {
                st.resident_bytes += g.bytes;
                st.resident.insert(id, g.clone());
            }
        }
        Ok(g)
    }

    /// Records `w · x` into `enc` for the `n` rows of `x` in `xb`, writing
    /// `yb` (`n × w.rows`).
    fn encode_matmul(
        &self,
        enc: &mut wgpu::CommandEncoder,
        w: &WeightView<'_>,
        g: &GpuWeight,
        xb: &wgpu::Buffer,
        yb: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        // One token of a quantized type (decode): the fused kernel, whose
        // activations are read as vec4 (rows of a multiple of 32 values).
        let kernel = if n == 1 && w.dtype.block_size() > 1 {
            Kernel::Matvec(w.dtype)
        } else {
            Kernel::Matmul(w.dtype)
        };
        let pipe = self.pipeline(kernel)?;
        let ab = match w.dtype {
            DType::Mlx(q) => (w.cols / q.group as usize) as u32,
            DType::FP8(q) => q.scale_cols(w.cols) as u32,
            _ => 0,
        };
        let maxg = self.limits.max_compute_workgroups_per_dimension as usize;
        let mut binds = Vec::with_capacity(g.chunks.len());
        for c in &g.chunks {
            let params: [u32; 8] = [
                c.rows as u32,
                w.cols as u32,
                n as u32,
                w.row_bytes() as u32,
                w.rows as u32,
                c.r0 as u32,
                w.cols.div_ceil(32) as u32,
                ab,
            ];
            let pb = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&params),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let (sc, bi) = match &c.aux {
                Some([s, b]) => (s, b),
                None => (&self.dummy, &self.dummy),
            };
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &self.mm_layout,
                entries: &[
                    bind(0, &c.w),
                    bind(1, xb),
                    bind(2, yb),
                    bind(3, &pb),
                    bind(4, sc),
                    bind(5, bi),
                ],
            });
            let groups = if kernel == Kernel::Matvec(w.dtype) && self.rows_per_lane > 0 {
                c.rows.div_ceil((self.wg * self.rows_per_lane) as usize)
            } else {
                c.rows
            };
            let gx = groups.min(maxg);
            let gy = groups.div_ceil(gx);
            let gz = n.div_ceil(wgsl::TILE as usize);
            if gy > maxg || gz > maxg {
                return Err(Error::Unsupported(format!(
                    "GPU backend: {} rows × {n} tokens exceed the dispatch limits",
                    c.rows
                )));
            }
            binds.push((bg, [gx as u32, gy as u32, gz as u32]));
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipe);
        for (bg, [gx, gy, gz]) in &binds {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(*gx, *gy, *gz);
        }
        Ok(())
    }

    /// Submits `enc` after copying `src` into a read-back buffer, waits,
    /// and copies the result into `out`.
    fn finish<T: bytemuck::Pod>(
        &self,
        mut enc: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        out: &mut [T],
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(out) as u64;
        let rb = self.scratch(
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        enc.copy_buffer_to_buffer(src, 0, &rb, 0, bytes.next_multiple_of(4).max(4));
        let t = Instant::now();
        self.queue.submit([enc.finish()]);
        let slice = rb.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| gpu_err("waiting for the device", e))?;
        self.gpu_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        rx.recv()
            .map_err(|e| gpu_err("read-back", e))?
            .map_err(|e| gpu_err("read-back", e))?;
        {
            let m = rb
                .get_mapped_range(..)
                .map_err(|e| gpu_err("reading back", e))?;
            let bytes = std::mem::size_of_val(out);
            bytemuck::cast_slice_mut::<T, u8>(out).copy_from_slice(&m[..bytes]);
        }
        rb.unmap();
        self.check()
    }

    /// Largest token count per pass so that no activation binding exceeds
    /// the limit.
    fn token_chunk(&self, widest: usize) -> Result<usize> {
        let per = self.max_binding() as usize / (4 * widest.max(1));
        if per == 0 {
            return Err(Error::Unsupported(format!(
                "GPU backend: a row of {widest} activations exceeds the adapter's binding limit"
            )));
        }
        Ok(
            per.min(
                self.limits.max_compute_workgroups_per_dimension as usize * wgsl::TILE as usize,
            ),
        )
    }

    fn ops_pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        k: Kernel,
        bufs: [&wgpu::Buffer; 5],
        q: [u32; 8],
        grid: [u32; 3],
    ) -> Result<()> {
        let pipe = self.pipeline(k)?;
        let qb = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&q),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.ops_layout,
            entries: &[
                bind(0, bufs[0]),
                bind(1, bufs[1]),
                bind(2, bufs[2]),
                bind(3, &qb),
                bind(4, bufs[3]),
                bind(5, bufs[4]),
            ],
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipe);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        Ok(())
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
    }

    fn rw(&self) -> wgpu::BufferUsages {
        wgpu::BufferUsages::COPY_SRC
    }

    fn fits(&self, bytes: usize) -> bool {
        (bytes as u64) <= self.max_binding()
    }

    /// Grid for `n` one-value-per-invocation elements.
    fn flat_grid(&self, n: usize) -> [u32; 3] {
        let groups = n.div_ceil(self.wg as usize).max(1);
        let maxg = self.limits.max_compute_workgroups_per_dimension as usize;
        let gx = groups.min(maxg);
        [gx as u32, groups.div_ceil(gx) as u32, 1]
    }

    fn try_rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) -> Result<()> {
        let d = w.len();
        let rows = x.len() / d.max(1);
        let xa = self.upload_f32(x, self.rw())?;
        let wb = self.upload_f32(w, wgpu::BufferUsages::empty())?;
        let mut enc = self.encoder();
        let q = [0, d as u32, 0, 0, 0, 0, eps.to_bits(), 0];
        let maxg = self.limits.max_compute_workgroups_per_dimension as usize;
        if rows > maxg {
            return Err(gpu_err("rms_norm", format!("{rows} rows")));
        }
        self.ops_pass(
            &mut enc,
            Kernel::RmsNorm,
            [&xa, &wb, &self.dummy, &self.dummy_rw, &self.dummy_rw],
            q,
            [rows as u32, 1, 1],
        )?;
        self.finish(enc, &xa, x)
    }

    fn try_mlp(&self, w: [WeightView<'_>; 3], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let [gate, up, down] = w;
        let (h, i, o) = (gate.cols, gate.rows, down.rows);
        let step = self.token_chunk(h.max(i).max(o))?;
        let (gg, ug, dg) = (self.weight(&gate)?, self.weight(&up)?, self.weight(&down)?);
        for t0 in (0..n).step_by(step.max(1)) {
            let nt = step.min(n - t0);
            let xb = self.upload_f32(&x[t0 * h..(t0 + nt) * h], wgpu::BufferUsages::empty())?;
            let st = wgpu::BufferUsages::STORAGE;
            let gb = self.scratch((nt * i * 4) as u64, st);
            let ub = self.scratch((nt * i * 4) as u64, st);
            let yb = self.scratch((nt * o * 4) as u64, st | wgpu::BufferUsages::COPY_SRC);
            let mut enc = self.encoder();
            self.encode_matmul(&mut enc, &gate, &gg, &xb, &gb, nt)?;
            self.encode_matmul(&mut enc, &up, &ug, &xb, &ub, nt)?;
            let q = [(nt * i) as u32, 0, 0, 0, 0, 0, 0, 0];
            self.ops_pass(
                &mut enc,
                Kernel::Swiglu,
                [&gb, &ub, &self.dummy, &self.dummy_rw, &self.dummy_rw],
                q,
                self.flat_grid(nt * i),
            )?;
            self.encode_matmul(&mut enc, &down, &dg, &gb, &yb, nt)?;
            self.finish(enc, &yb, &mut y[t0 * o..(t0 + nt) * o])?;
        }
        Ok(())
    }

    fn try_matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        if x.len() != n * w.cols || y.len() != n * w.rows {
            return Err(Error::Invalid(format!(
                "matmul shapes: {}x{} weight, {} inputs, {} outputs for {n} rows",
                w.rows,
                w.cols,
                x.len(),
                y.len()
            )));
        }
        if n == 0 || w.rows == 0 {
            return Ok(());
        }
        let g = self.weight(&w)?;
        let step = self.token_chunk(w.cols.max(w.rows))?;
        for t0 in (0..n).step_by(step) {
            let nt = step.min(n - t0);
            let xb = self.upload_f32(
                &x[t0 * w.cols..(t0 + nt) * w.cols],
                wgpu::BufferUsages::empty(),
            )?;
            let yb = self.scratch(
                (nt * w.rows * 4) as u64,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            );
            let mut enc = self.encoder();
            self.encode_matmul(&mut enc, &w, &g, &xb, &yb, nt)?;
            self.finish(enc, &yb, &mut y[t0 * w.rows..(t0 + nt) * w.rows])?;
        }
        Ok(())
    }

    fn try_rope(
        &self,
        rope: &Rope,
        pos0: usize,
        x: &mut [f32],
        n: usize,
        head_dim: usize,
    ) -> Result<()> {
        let d = x.len() / n.max(1);
        let half = rope.rot_dim / 2;
        // The angle tables come from the host, as on the CPU: a GPU's sin
        // and cos are not accurate far from zero.
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        let (mut c1, mut s1) = (Vec::new(), Vec::new());
        for t in 0..n {
            rope.tables(pos0 + t, &mut c1, &mut s1);
            cos.extend_from_slice(&c1);
            sin.extend_from_slice(&s1);
        }
        let xa = self.upload_f32(x, self.rw())?;
        let cb = self.upload_f32(&cos, wgpu::BufferUsages::empty())?;
        let sb = self.upload_f32(&sin, wgpu::BufferUsages::empty())?;
        let style = match rope.style {
            RopeStyle::Neox => 0,
            RopeStyle::Interleaved => 1,
        };
        let q = [
            0,
            d as u32,
            (d / head_dim) as u32,
            head_dim as u32,
            rope.rot_dim as u32,
            style,
            0,
            0,
        ];
        let mut enc = self.encoder();
        self.ops_pass(
            &mut enc,
            Kernel::Rope,
            [&xa, &cb, &sb, &self.dummy_rw, &self.dummy_rw],
            q,
            [1, n as u32, 1],
        )?;
        self.finish(enc, &xa, x)
    }

    fn try_route(
        &self,
        logits: &mut [f32],
        n: usize,
        k: usize,
        chosen: &mut [usize],
    ) -> Result<()> {
        let ne = logits.len() / n.max(1);
        let xa = self.upload_f32(logits, self.rw())?;
        let ib = self.scratch(
            ((n * k + n * ne) * 4) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let q = [n as u32, ne as u32, k as u32, 0, 0, 0, 0, 0];
        let mut enc = self.encoder();
        self.ops_pass(
            &mut enc,
            Kernel::Route,
            [&xa, &self.dummy, &self.dummy, &self.dummy_rw, &ib],
            q,
            [n as u32, 1, 1],
        )?;
        // Probabilities and choices come back in one submission.
        let rb = self.scratch(
            ((n * k) * 4) as u64,
            wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        );
        enc.copy_buffer_to_buffer(&ib, 0, &rb, 0, ((n * k) * 4) as u64);
        self.finish(enc, &xa, logits)?;
        let mut idx = vec![0u32; n * k];
        self.finish(self.encoder(), &rb, &mut idx)?;
        for (c, &v) in chosen.iter_mut().zip(&idx) {
            *c = v as usize;
            if *c >= ne {
                return Err(gpu_err("route", "no expert chosen (NaN router logits?)"));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn try_attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        pos0: usize,
        p: &AttnParams<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let keys = pos0 + n;
        // Per head, a sink logit follows the queries: the model's
        // (gpt-oss), or one too small to take any share.
        let mut qs = Vec::with_capacity(q.len() + p.n_heads);
        qs.extend_from_slice(q);
        match p.sinks {
            Some(s) if s.len() == p.n_heads => qs.extend_from_slice(s),
            Some(s) => {
                return Err(Error::Invalid(format!(
                    "{} attention sinks for {} heads",
                    s.len(),
                    p.n_heads
                )))
            }
            None => qs.resize(q.len() + p.n_heads, f32::MIN),
        }
        let qa = self.upload_f32(&qs, wgpu::BufferUsages::empty())?;
        let kb = self.upload_f32(
            &k[..keys * p.n_kv_heads * p.head_dim],
            wgpu::BufferUsages::empty(),
        )?;
        let vb = self.upload_f32(
            &v[..keys * p.n_kv_heads * p.head_dim],
            wgpu::BufferUsages::empty(),
        )?;
        let ob = self.scratch(
            std::mem::size_of_val(out) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let scores = n * p.n_heads * keys * 4;
        if !self.fits(scores) {
            return Err(gpu_err("attention", format!("{scores} bytes of scores")));
        }
        let sb = self.scratch(scores as u64, wgpu::BufferUsages::STORAGE);
        let qp = [
            pos0 as u32,
            keys as u32,
            p.n_heads as u32,
            p.head_dim as u32,
            p.n_kv_heads as u32,
            p.window.unwrap_or(0) as u32,
            p.scale.to_bits(),
            p.chunk.unwrap_or(0) as u32,
        ];
        let mut enc = self.encoder();
        self.ops_pass(
            &mut enc,
            Kernel::Attention,
            [&qa, &kb, &vb, &ob, &sb],
            qp,
            [p.n_heads as u32, n as u32, 1],
        )?;
        self.finish(enc, &ob, out)
    }
}

fn bind(binding: u32, b: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: b.as_entire_binding(),
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &str {
        "metal"
    }

    fn matmul(&self, w: WeightView<'_>, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.try_matmul(w, x, n, y)
    }

    fn mlp(&self, w: [WeightView<'_>; 3], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.try_mlp(w, x, n, y)
    }

    fn attention(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        pos0: usize,
        p: &AttnParams<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        self.try_attention(q, k, v, n, pos0, p, out)
    }

    fn rms_norm(&self, x: &mut [f32], w: &[f32], eps: f32) -> Result<()> {
        self.try_rms_norm(x, w, eps)
    }

    fn rope(
        &self,
        rope: &Rope,
        pos0: usize,
        x: &mut [f32],
        n: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.try_rope(rope, pos0, x, n, head_dim)
    }

    fn route(&self, logits: &mut [f32], n: usize, k: usize, chosen: &mut [usize]) -> Result<()> {
        self.try_route(logits, n, k, chosen)
    }

    fn device_seconds(&self) -> Option<f64> {
        Some(self.gpu_ns.load(Ordering::Relaxed) as f64 * 1e-9)
    }
}
