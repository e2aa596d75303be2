//! The backend proper (built with the `wgpu` feature).

use crate::wgsl;

mod exec;
mod host;

use parking_lot::Mutex;
use sluice_core::ops::{Rope, RopeStyle};
use sluice_core::{AttnParams, Backend, DType, DeviceTraffic, Error, Result, WeightView};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
    /// On unified-memory adapters, write inputs straight into buffers the
    /// kernels read (one copy); `false` stages them through the queue as
    /// on a discrete GPU (tests use it to cover that path).
    pub mapped: bool,
    /// Offer the device-resident executor
    /// ([`Backend::device_exec`]): the forward pass keeps activations on
    /// the device and submits once per layer. `false` keeps one round
    /// trip per operation (the path to compare against).
    pub device_forward: bool,
    /// On unified-memory adapters that can import host memory, bind
    /// streamed experts where the drive wrote them
    /// ([`sluice_core::DeviceExec::map_host`]); `false` copies them into
    /// device buffers per use (the path to compare against).
    pub bind_host: bool,
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
            mapped: true,
            device_forward: true,
            bind_host: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kernel {
    Matmul(DType),
    Matvec(DType),
    Rows(DType),
    Argmax,
    RmsNorm,
    Swiglu,
    Rope,
    Route,
    Attention,
    ClampedSwiglu,
    Axpy,
    Gather,
    AddRows,
    Clamp,
    SigmoidMul,
    ScaleRows,
    ConvStep,
    DeltaRule,
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
    w: Buf,
    aux: Option<[Buf; 2]>,
    /// Where the data, scales and biases start in their bindings: a word
    /// of the data, a value of the scales and biases (non-zero for weights
    /// bound in place in host memory).
    offs: [u32; 3],
}

/// A device buffer and the bytes of it that a call binds.
#[derive(Clone)]
struct Buf {
    b: wgpu::Buffer,
    off: u64,
    len: u64,
}

/// What a pooled buffer is for; each use has its own free lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Use {
    /// Host-written inputs: activations and streamed weights. On
    /// unified-memory adapters they are mapped for writing while free, so
    /// that the host writes straight into the memory the kernels read.
    Upload,
    /// Kernel outputs and intermediates.
    Scratch,
    /// Read-back staging.
    Readback,
    /// Kernel parameters.
    Uniform,
}

/// Map states of a pooled upload buffer (wgpu does not report them).
const UNMAPPED: u8 = 0;
const PENDING: u8 = 1;
const MAPPED: u8 = 2;
const FAILED: u8 = 3;

struct Pooled {
    b: wgpu::Buffer,
    map: Arc<AtomicU8>,
}

impl Pooled {
    /// Asks for the whole buffer mapped for writing; `map` follows.
    fn map_for_writing(&self) {
        self.map.store(PENDING, Ordering::Relaxed);
        let f = self.map.clone();
        self.b.slice(..).map_async(wgpu::MapMode::Write, move |r| {
            f.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Relaxed);
        });
    }
}

/// The pooled buffers one call holds. They go back to the pools when the
/// call has waited for its submission ([`WgpuBackend::finish`] marks it
/// done); a call that failed midway drops them instead, since the device
/// may still be using them.
struct Lease<'a> {
    be: &'a WgpuBackend,
    held: Vec<(Use, u64, Pooled)>,
    done: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.done {
            self.be.give_back(std::mem::take(&mut self.held));
        }
    }
}

/// A resident weight's id and the part of its matrix it is.
type WeightKey = (u64, Option<(usize, usize)>);

#[derive(Default)]
struct State {
    pipelines: HashMap<Kernel, Arc<wgpu::ComputePipeline>>,
    /// Resident weights by id and part.
    resident: HashMap<WeightKey, Arc<GpuWeight>>,
    resident_bytes: u64,
    /// Session buffers of the device-resident executor.
    dev: HashMap<u64, Buf>,
    /// Host memory bound in place, by start address.
    hosts: BTreeMap<usize, host::HostMap>,
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
    dummy: Buf,
    /// Bound to the writable slots a kernel does not use.
    dummy_rw: Buf,
    state: Mutex<State>,
    /// Free buffers by use and size class.
    pool: Mutex<HashMap<(Use, u64), Vec<Pooled>>>,
    traffic: Mutex<DeviceTraffic>,
    gpu_ns: AtomicU64,
    /// Names of device-resident buffers (session and batch).
    dev_ids: AtomicU64,
    device_forward: bool,
    /// Alignment of host memory the device imports; `None`: no imports.
    host_align: Option<usize>,
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
        let mappable =
            unified && opts.mapped && have.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
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
        let desc = wgpu::DeviceDescriptor {
            label: Some("sluice"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        // Host memory is bound in place only where the device reads the
        // host's RAM anyway.
        let (device, queue, host_align) = host::open(&adapter, &desc, unified && opts.bind_host)
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
        let filler = |label| Buf {
            b: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            off: 0,
            len: 16,
        };
        let (dummy, dummy_rw) = (filler("dummy"), filler("dummy_rw"));
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
            pool: Mutex::default(),
            traffic: Mutex::default(),
            gpu_ns: AtomicU64::new(0),
            dev_ids: AtomicU64::new(1),
            device_forward: opts.device_forward,
            host_align,
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
        self.traffic.lock().weight_bytes_up
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
            Kernel::Rows(dt) => (wgsl::rows(dt, self.f16), "main", &self.mm_layout),
            Kernel::Argmax => (wgsl::OPS.to_string(), "argmax", &self.ops_layout),
            Kernel::RmsNorm => (wgsl::OPS.to_string(), "rms_norm", &self.ops_layout),
            Kernel::Swiglu => (wgsl::OPS.to_string(), "swiglu", &self.ops_layout),
            Kernel::Rope => (wgsl::OPS.to_string(), "rope", &self.ops_layout),
            Kernel::Route => (wgsl::OPS.to_string(), "route", &self.ops_layout),
            Kernel::Attention => (wgsl::OPS.to_string(), "attention", &self.ops_layout),
            Kernel::ClampedSwiglu => (wgsl::OPS.to_string(), "clamped_swiglu", &self.ops_layout),
            Kernel::Axpy => (wgsl::OPS.to_string(), "axpy", &self.ops_layout),
            Kernel::Gather => (wgsl::OPS.to_string(), "gather", &self.ops_layout),
            Kernel::AddRows => (wgsl::OPS.to_string(), "add_rows", &self.ops_layout),
            Kernel::Clamp => (wgsl::OPS.to_string(), "clamp_values", &self.ops_layout),
            Kernel::SigmoidMul => (wgsl::OPS.to_string(), "sigmoid_mul", &self.ops_layout),
            Kernel::ScaleRows => (wgsl::OPS.to_string(), "scale_rows", &self.ops_layout),
            Kernel::ConvStep => (wgsl::OPS.to_string(), "conv_step", &self.ops_layout),
            Kernel::DeltaRule => (wgsl::OPS.to_string(), "delta_rule", &self.ops_layout),
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

    fn count(&self, f: impl FnOnce(&mut DeviceTraffic)) {
        f(&mut self.traffic.lock());
    }

    fn usage(&self, u: Use) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as B;
        match u {
            Use::Upload if self.mappable => B::STORAGE | B::COPY_SRC | B::MAP_WRITE,
            Use::Upload | Use::Scratch => B::STORAGE | B::COPY_SRC | B::COPY_DST,
            Use::Readback => B::MAP_READ | B::COPY_DST,
            Use::Uniform => B::UNIFORM | B::COPY_DST,
        }
    }

    /// A pooled buffer of at least `len` bytes (bound as `len` rounded up
    /// to whole words), held by `lease` until its call ends.
    fn take(&self, lease: &mut Lease<'_>, u: Use, len: u64) -> Buf {
        let len = len.max(4).next_multiple_of(4);
        let class = size_class(len);
        let got = self.pool.lock().get_mut(&(u, class)).and_then(Vec::pop);
        let p = got.unwrap_or_else(|| {
            let mapped = u == Use::Upload && self.mappable;
            self.count(|t| t.buffers_created += 1);
            Pooled {
                b: self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: class,
                    usage: self.usage(u),
                    mapped_at_creation: mapped,
                }),
                map: Arc::new(AtomicU8::new(if mapped { MAPPED } else { UNMAPPED })),
            }
        });
        let b = Buf {
            b: p.b.clone(),
            off: 0,
            len,
        };
        lease.held.push((u, class, p));
        b
    }

    /// Returns a finished call's buffers to the pools; upload buffers of a
    /// unified-memory adapter are mapped again for the next call's writes.
    fn give_back(&self, held: Vec<(Use, u64, Pooled)>) {
        let mut remapped = false;
        for (u, _, p) in &held {
            if *u == Use::Upload && self.mappable {
                p.map_for_writing();
                remapped = true;
            }
        }
        {
            let mut pool = self.pool.lock();
            for (u, class, p) in held {
                pool.entry((u, class)).or_default().push(p);
            }
        }
        if remapped {
            // The device is idle: the maps complete without blocking.
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
    }

    /// Waits until the pooled upload buffer `p` is mapped for writing (at
    /// once when the device is idle, as it is between calls).
    fn until_mapped(&self, p: &Pooled) -> Result<()> {
        if p.map.load(Ordering::Relaxed) == UNMAPPED {
            p.map_for_writing();
        }
        if p.map.load(Ordering::Relaxed) == PENDING {
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
        if p.map.load(Ordering::Relaxed) == PENDING {
            self.count(|t| t.waits += 1);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| gpu_err("mapping an upload buffer", e))?;
        }
        match p.map.load(Ordering::Relaxed) {
            MAPPED => Ok(()),
            _ => Err(gpu_err("mapping an upload buffer", "the map failed")),
        }
    }

    /// A pooled storage buffer holding `bytes` (padded with zeros to whole
    /// words). On unified-memory adapters the host writes it in place,
    /// the one copy the data makes; elsewhere the queue stages it.
    fn put(&self, lease: &mut Lease<'_>, bytes: &[u8], weight: bool) -> Result<Buf> {
        let b = self.take(lease, Use::Upload, bytes.len() as u64);
        if self.mappable {
            let p = &lease.held.last().expect("just taken").2;
            self.until_mapped(p)?;
            {
                let mut m =
                    p.b.get_mapped_range_mut(..b.len)
                        .map_err(|e| gpu_err("mapping an upload buffer", e))?;
                m.slice(..bytes.len()).copy_from_slice(bytes);
                m.slice(bytes.len()..).fill(0);
            }
            p.b.unmap();
            p.map.store(UNMAPPED, Ordering::Relaxed);
        } else {
            let whole = bytes.len() / 4 * 4;
            if whole > 0 {
                self.queue.write_buffer(&b.b, 0, &bytes[..whole]);
            }
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            if whole < b.len as usize {
                self.queue.write_buffer(&b.b, whole as u64, &tail);
            }
        }
        let n = bytes.len() as u64;
        self.count(|t| {
            if weight {
                t.weight_bytes_up += n
            } else {
                t.activation_bytes_up += n
            }
        });
        self.check()?;
        Ok(b)
    }

    fn put_f32(&self, lease: &mut Lease<'_>, v: &[f32]) -> Result<Buf> {
        self.put(lease, bytemuck::cast_slice(v), false)
    }

    /// A storage buffer of `bytes` that lives as long as the model: a
    /// resident weight's, written once at creation.
    fn upload_kept(&self, bytes: &[u8]) -> Result<Buf> {
        let len = (bytes.len().max(4) as u64).next_multiple_of(4);
        let mut usage = wgpu::BufferUsages::STORAGE;
        if self.mappable {
            usage |= wgpu::BufferUsages::MAP_WRITE;
        }
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: len,
            usage,
            mapped_at_creation: true,
        });
        {
            let mut m = b
                .get_mapped_range_mut(..)
                .map_err(|e| gpu_err("mapping an upload buffer", e))?;
            m.slice(..bytes.len()).copy_from_slice(bytes);
            m.slice(bytes.len()..).fill(0);
        }
        b.unmap();
        let n = bytes.len() as u64;
        self.count(|t| {
            t.buffers_created += 1;
            t.weight_bytes_up += n;
        });
        self.check()?;
        Ok(Buf { b, off: 0, len })
    }

    /// The first device error since the last check (wgpu reports them
    /// asynchronously to a handler, which would otherwise panic).
    fn check(&self) -> Result<()> {
        match self.errors.lock().take() {
            Some(e) => Err(gpu_err("device error", e)),
            None => Ok(()),
        }
    }

    /// Kernel parameters in a pooled uniform buffer.
    fn params(&self, lease: &mut Lease<'_>, q: &[u32]) -> Buf {
        let bytes = std::mem::size_of_val(q) as u64;
        let b = self.take(lease, Use::Uniform, bytes);
        self.queue.write_buffer(&b.b, 0, bytemuck::cast_slice(q));
        self.count(|t| t.activation_bytes_up += bytes);
        b
    }

    /// Splits `w` into row ranges of at most one binding each and uploads
    /// them: into buffers kept with the model when `lease` is `None`, else
    /// into pooled ones the call holds.
    fn to_device(
        &self,
        w: &WeightView<'_>,
        mut lease: Option<&mut Lease<'_>>,
    ) -> Result<GpuWeight> {
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
        let mut up = |bytes: &[u8]| match lease.as_deref_mut() {
            Some(l) => self.put(l, bytes, true),
            None => self.upload_kept(bytes),
        };
        let per = (max / rb.max(1)).clamp(1, w.rows.max(1));
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < w.rows {
            let rows = per.min(w.rows - r0);
            let buf = up(&w.data[r0 * rb..(r0 + rows) * rb])?;
            let aux = if let DType::FP8(q) = w.dtype {
                // One f32 scale line per row: the shader then indexes
                // scales as it does MLX's.
                let mut s = Vec::with_capacity(rows * q.scale_cols(w.cols));
                for r in r0..r0 + rows {
                    sluice_core::fp8::line_f32(q, w.fp8_scale_line(q, r), &mut s);
                }
                Some([up(bytemuck::cast_slice(&s))?, up(&[])?])
            } else if ab > 0 {
                Some([
                    up(&w.scales[r0 * ab..(r0 + rows) * ab])?,
                    up(&w.biases[r0 * ab..(r0 + rows) * ab])?,
                ])
            } else {
                None
            };
            chunks.push(Chunk {
                r0,
                rows,
                w: buf,
                aux,
                offs: [0; 3],
            });
            r0 += rows;
        }
        let bytes = (w.data.len() + w.scales.len() + w.biases.len()) as u64;
        Ok(GpuWeight { chunks, bytes })
    }

    /// The device copy of `w`: the kept one for a resident weight (made on
    /// first use while the budget allows), the bytes where they lie for a
    /// weight in imported host memory (a streamed expert's slot), else one
    /// in buffers the call holds.
    fn weight(&self, w: &WeightView<'_>, lease: &mut Lease<'_>) -> Result<Arc<GpuWeight>> {
        if let Some(g) = self.resident(w)? {
            return Ok(g);
        }
        if let Some(g) = self.in_place(w) {
            w.check()?;
            return Ok(Arc::new(g));
        }
        Ok(Arc::new(self.to_device(w, Some(lease))?))
    }

    /// The kept device copy of `w`, made now if the budget allows; `None`
    /// for a weight without an id or beyond the budget.
    fn resident(&self, w: &WeightView<'_>) -> Result<Option<Arc<GpuWeight>>> {
        let Some(id) = w.id.map(|i| (i, w.part)) else {
            return Ok(None);
        };
        if let Some(g) = self.state.lock().resident.get(&id) {
            return Ok(Some(g.clone()));
        }
        let bytes = (w.data.len() + w.scales.len() + w.biases.len()) as u64;
        if self.state.lock().resident_bytes + bytes > self.budget {
            return Ok(None);
        }
        let g = Arc::new(self.to_device(w, None)?);
        let mut st = self.state.lock();
        st.resident_bytes += g.bytes;
        st.resident.insert(id, g.clone());
        Ok(Some(g))
    }

    /// The parameters of a product (or row gather) over chunk `c` of `w`.
    fn mm_params(w: &WeightView<'_>, c: &Chunk, n: usize) -> [u32; 12] {
        let ab = match w.dtype {
            DType::Mlx(q) => (w.cols / q.group as usize) as u32,
            DType::FP8(q) => q.scale_cols(w.cols) as u32,
            _ => 0,
        };
        [
            c.rows as u32,
            w.cols as u32,
            n as u32,
            w.row_bytes() as u32,
            w.rows as u32,
            c.r0 as u32,
            w.cols.div_ceil(32) as u32,
            ab,
            c.offs[0] * 4,
            c.offs[1],
            c.offs[2],
            0,
        ]
    }

    /// The bind group of chunk `c` of a weight for `x` and `y`.
    fn mm_group(
        &self,
        lease: &mut Lease<'_>,
        params: &[u32],
        c: &Chunk,
        x: &Buf,
        y: &Buf,
    ) -> wgpu::BindGroup {
        let pb = self.params(lease, params);
        let (sc, bi) = match &c.aux {
            Some([s, b]) => (s, b),
            None => (&self.dummy, &self.dummy),
        };
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.mm_layout,
            entries: &[
                bind(0, &c.w),
                bind(1, x),
                bind(2, y),
                bind(3, &pb),
                bind(4, sc),
                bind(5, bi),
            ],
        })
    }

    /// Records the dequantized rows `idx[t]` (u32) of `w` into the `n`
    /// rows of `yb` (`w.cols` wide).
    #[allow(clippy::too_many_arguments)]
    fn encode_rows(
        &self,
        lease: &mut Lease<'_>,
        enc: &mut wgpu::CommandEncoder,
        w: &WeightView<'_>,
        g: &GpuWeight,
        idx: &Buf,
        yb: &Buf,
        n: usize,
    ) -> Result<()> {
        let pipe = self.pipeline(Kernel::Rows(w.dtype))?;
        let grid = self.flat_grid(n * w.cols.div_ceil(32));
        let mut groups = Vec::with_capacity(g.chunks.len());
        for c in &g.chunks {
            let params = Self::mm_params(w, c, n);
            groups.push(self.mm_group(lease, &params, c, idx, yb));
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipe);
        for bg in &groups {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        Ok(())
    }

    /// Records `w · x` into `enc` for the `n` rows of `x` in `xb`, writing
    /// `yb` (`n × w.rows`).
    #[allow(clippy::too_many_arguments)]
    fn encode_matmul(
        &self,
        lease: &mut Lease<'_>,
        enc: &mut wgpu::CommandEncoder,
        w: &WeightView<'_>,
        g: &GpuWeight,
        xb: &Buf,
        yb: &Buf,
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
        let maxg = self.limits.max_compute_workgroups_per_dimension as usize;
        let mut binds = Vec::with_capacity(g.chunks.len());
        for c in &g.chunks {
            let params = Self::mm_params(w, c, n);
            let bg = self.mm_group(lease, &params, c, xb, yb);
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

    /// Submits `enc` after copying each source into one read-back buffer,
    /// waits once, and copies the results into their outputs; the call's
    /// buffers then go back to the pools.
    fn finish(
        &self,
        mut lease: Lease<'_>,
        mut enc: wgpu::CommandEncoder,
        reads: &mut [(&Buf, u64, &mut [u8])],
    ) -> Result<()> {
        let total: u64 = reads.iter().map(|(_, _, o)| o.len() as u64).sum();
        let rb = self.take(&mut lease, Use::Readback, total);
        let mut off = 0;
        for (src, from, out) in reads.iter() {
            let n = out.len() as u64;
            if !n.is_multiple_of(4) || !from.is_multiple_of(4) || from + n > src.len {
                return Err(gpu_err(
                    "read-back",
                    format!("{n} bytes at {from} of {}", src.len),
                ));
            }
            if n > 0 {
                enc.copy_buffer_to_buffer(&src.b, *from, &rb.b, off, n);
            }
            off += n;
        }
        let t = Instant::now();
        self.queue.submit([enc.finish()]);
        let slice = rb.b.slice(..rb.len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.count(|t| {
            t.submissions += 1;
            t.waits += 1;
            t.bytes_down += total;
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
            let m = slice
                .get_mapped_range()
                .map_err(|e| gpu_err("reading back", e))?;
            let mut off = 0;
            for (_, _, out) in reads.iter_mut() {
                out.copy_from_slice(&m[off..off + out.len()]);
                off += out.len();
            }
        }
        rb.b.unmap();
        self.check()?;
        lease.done = true;
        Ok(())
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
        lease: &mut Lease<'_>,
        enc: &mut wgpu::CommandEncoder,
        k: Kernel,
        bufs: [&Buf; 5],
        q: [u32; 8],
        grid: [u32; 3],
    ) -> Result<()> {
        let pipe = self.pipeline(k)?;
        let qb = self.params(lease, &q);
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

    fn lease(&self) -> Lease<'_> {
        Lease {
            be: self,
            held: Vec::new(),
            done: false,
        }
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
        let mut l = self.lease();
        let xa = self.put_f32(&mut l, x)?;
        let wb = self.put_f32(&mut l, w)?;
        let mut enc = self.encoder();
        let q = [0, d as u32, 0, 0, 0, 0, eps.to_bits(), 0];
        let maxg = self.limits.max_compute_workgroups_per_dimension as usize;
        if rows > maxg {
            return Err(gpu_err("rms_norm", format!("{rows} rows")));
        }
        self.ops_pass(
            &mut l,
            &mut enc,
            Kernel::RmsNorm,
            [&xa, &wb, &self.dummy, &self.dummy_rw, &self.dummy_rw],
            q,
            [rows as u32, 1, 1],
        )?;
        self.finish(l, enc, &mut [(&xa, 0, bytemuck::cast_slice_mut(x))])
    }

    fn try_mlp(&self, w: [WeightView<'_>; 3], x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let [gate, up, down] = w;
        let (h, i, o) = (gate.cols, gate.rows, down.rows);
        let step = self.token_chunk(h.max(i).max(o))?;
        // Streamed weights' buffers are held until every chunk is done.
        let mut wl = self.lease();
        let (gg, ug, dg) = (
            self.weight(&gate, &mut wl)?,
            self.weight(&up, &mut wl)?,
            self.weight(&down, &mut wl)?,
        );
        for t0 in (0..n).step_by(step.max(1)) {
            let nt = step.min(n - t0);
            let mut l = self.lease();
            let xb = self.put_f32(&mut l, &x[t0 * h..(t0 + nt) * h])?;
            let gb = self.take(&mut l, Use::Scratch, (nt * i * 4) as u64);
            let ub = self.take(&mut l, Use::Scratch, (nt * i * 4) as u64);
            let yb = self.take(&mut l, Use::Scratch, (nt * o * 4) as u64);
            let mut enc = self.encoder();
            self.encode_matmul(&mut l, &mut enc, &gate, &gg, &xb, &gb, nt)?;
            self.encode_matmul(&mut l, &mut enc, &up, &ug, &xb, &ub, nt)?;
            let q = [(nt * i) as u32, 0, 0, 0, 0, 0, 0, 0];
            self.ops_pass(
                &mut l,
                &mut enc,
                Kernel::Swiglu,
                [&gb, &ub, &self.dummy, &self.dummy_rw, &self.dummy_rw],
                q,
                self.flat_grid(nt * i),
            )?;
            self.encode_matmul(&mut l, &mut enc, &down, &dg, &gb, &yb, nt)?;
            let out = bytemuck::cast_slice_mut(&mut y[t0 * o..(t0 + nt) * o]);
            self.finish(l, enc, &mut [(&yb, 0, out)])?;
        }
        wl.done = true;
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
        let mut wl = self.lease();
        let g = self.weight(&w, &mut wl)?;
        let step = self.token_chunk(w.cols.max(w.rows))?;
        for t0 in (0..n).step_by(step) {
            let nt = step.min(n - t0);
            let mut l = self.lease();
            let xb = self.put_f32(&mut l, &x[t0 * w.cols..(t0 + nt) * w.cols])?;
            let yb = self.take(&mut l, Use::Scratch, (nt * w.rows * 4) as u64);
            let mut enc = self.encoder();
            self.encode_matmul(&mut l, &mut enc, &w, &g, &xb, &yb, nt)?;
            let out = bytemuck::cast_slice_mut(&mut y[t0 * w.rows..(t0 + nt) * w.rows]);
            self.finish(l, enc, &mut [(&yb, 0, out)])?;
        }
        wl.done = true;
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
        // The angle tables come from the host, as on the CPU.
        let (cos, sin) = rope.tables_for(pos0, n);
        let mut l = self.lease();
        let xa = self.put_f32(&mut l, x)?;
        let cb = self.put_f32(&mut l, &cos)?;
        let sb = self.put_f32(&mut l, &sin)?;
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
            &mut l,
            &mut enc,
            Kernel::Rope,
            [&xa, &cb, &sb, &self.dummy_rw, &self.dummy_rw],
            q,
            [1, n as u32, 1],
        )?;
        self.finish(l, enc, &mut [(&xa, 0, bytemuck::cast_slice_mut(x))])
    }

    fn try_route(
        &self,
        logits: &mut [f32],
        n: usize,
        k: usize,
        chosen: &mut [usize],
    ) -> Result<()> {
        let ne = logits.len() / n.max(1);
        let mut l = self.lease();
        let xa = self.put_f32(&mut l, logits)?;
        let ib = self.take(&mut l, Use::Scratch, ((n * k + n * ne) * 4) as u64);
        let q = [n as u32, ne as u32, k as u32, 0, 0, 0, 0, 0];
        let mut enc = self.encoder();
        self.ops_pass(
            &mut l,
            &mut enc,
            Kernel::Route,
            [&xa, &self.dummy, &self.dummy, &self.dummy_rw, &ib],
            q,
            [n as u32, 1, 1],
        )?;
        // Probabilities and choices come back in one submission.
        let mut idx = vec![0u32; n * k];
        self.finish(
            l,
            enc,
            &mut [
                (&xa, 0, bytemuck::cast_slice_mut(logits)),
                (&ib, 0, bytemuck::cast_slice_mut(&mut idx)),
            ],
        )?;
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
        let scores = n * p.n_heads * keys * 4;
        if !self.fits(scores) {
            return Err(gpu_err("attention", format!("{scores} bytes of scores")));
        }
        let mut l = self.lease();
        let qa = self.put_f32(&mut l, &qs)?;
        let kb = self.put_f32(&mut l, &k[..keys * p.n_kv_heads * p.head_dim])?;
        let vb = self.put_f32(&mut l, &v[..keys * p.n_kv_heads * p.head_dim])?;
        let ob = self.take(&mut l, Use::Scratch, std::mem::size_of_val(out) as u64);
        let sb = self.take(&mut l, Use::Scratch, scores as u64);
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
            &mut l,
            &mut enc,
            Kernel::Attention,
            [&qa, &kb, &vb, &ob, &sb],
            qp,
            [p.n_heads as u32, n as u32, 1],
        )?;
        self.finish(l, enc, &mut [(&ob, 0, bytemuck::cast_slice_mut(out))])
    }
}

/// Pooled buffer sizes: powers of two up to 4 KiB, then eighths of the
/// next power of two (at most 1/8 unused), so that a call's buffers are
/// found again by the next call of similar shape.
fn size_class(len: u64) -> u64 {
    if len <= 4096 {
        return len.max(256).next_power_of_two();
    }
    len.next_multiple_of(len.next_power_of_two() / 8)
}

fn bind(binding: u32, b: &Buf) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &b.b,
            offset: b.off,
            size: std::num::NonZeroU64::new(b.len),
        }),
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

    fn device_traffic(&self) -> Option<DeviceTraffic> {
        Some(*self.traffic.lock())
    }

    fn device_exec(&self) -> Option<&dyn sluice_core::DeviceExec> {
        if self.device_forward {
            Some(self)
        } else {
            None
        }
    }
}
