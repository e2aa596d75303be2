//! [`DeviceExec`] for the wgpu backend: buffers a session keeps on the
//! device, and batches that record a layer's work into one command
//! encoder, submitted and waited for once.

use super::{gpu_err, Buf, Kernel, Lease, Use, WgpuBackend};
use sluice_core::{DevBuf, DevOp, DeviceBatch, DeviceExec, Error, Result, WeightView};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

impl WgpuBackend {
    fn dev_id(&self) -> u64 {
        self.dev_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// A session buffer by its handle, checked to hold `d.len` values.
    fn kept_buf(&self, d: DevBuf) -> Result<Buf> {
        let b = self.state.lock().dev.get(&d.id).cloned();
        match b {
            Some(b) if (d.len as u64) * 4 <= b.len => Ok(b),
            _ => Err(Error::Invalid(format!(
                "GPU backend: no device buffer {} of {} values",
                d.id, d.len
            ))),
        }
    }
}

impl DeviceExec for WgpuBackend {
    fn alloc(&self, len: usize) -> Result<DevBuf> {
        let bytes = (len.max(1) as u64) * 4;
        // Kernels bind a session buffer whole (a KV cache, for one).
        if bytes > self.max_binding() {
            return Err(gpu_err(
                "allocating a session buffer",
                format!(
                    "{} exceed the adapter's {} binding limit (a KV cache this long does not fit one binding)",
                    sluice_core::fmt_size(bytes),
                    sluice_core::fmt_size(self.max_binding())
                ),
            ));
        }
        // Created zeroed (wgpu clears new buffers).
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("session"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.count(|t| t.buffers_created += 1);
        self.check()?;
        let id = self.dev_id();
        self.state.lock().dev.insert(
            id,
            Buf {
                b,
                off: 0,
                len: bytes,
            },
        );
        Ok(DevBuf { id, len })
    }

    fn write(&self, b: DevBuf, off: usize, data: &[f32]) -> Result<()> {
        if off + data.len() > b.len {
            return Err(Error::Invalid(format!(
                "GPU backend: writing {} values at {off} of a {}-value buffer",
                data.len(),
                b.len
            )));
        }
        let buf = self.kept_buf(b)?;
        if !data.is_empty() {
            self.queue
                .write_buffer(&buf.b, off as u64 * 4, bytemuck::cast_slice(data));
        }
        self.count(|t| t.activation_bytes_up += std::mem::size_of_val(data) as u64);
        self.check()
    }

    fn read(&self, b: DevBuf, off: usize, out: &mut [f32]) -> Result<()> {
        let buf = self.kept_buf(b)?;
        let l = self.lease();
        let enc = self.encoder();
        self.finish(
            l,
            enc,
            &mut [(&buf, off as u64 * 4, bytemuck::cast_slice_mut(out))],
        )
    }

    fn release(&self, b: DevBuf) {
        self.state.lock().dev.remove(&b.id);
    }

    fn batch(&self) -> Box<dyn DeviceBatch + '_> {
        Box::new(Batch {
            be: self,
            lease: self.lease(),
            enc: self.encoder(),
            temps: HashMap::new(),
        })
    }

    fn host_align(&self) -> Option<usize> {
        self.host_align
    }

    unsafe fn map_host(&self, ptr: *const u8, len: usize) -> Result<bool> {
        // SAFETY: the caller's promise is the one `import_host` needs.
        Ok(unsafe { self.import_host(ptr, len) })
    }

    fn forget_host(&self, ptr: *const u8) {
        self.forget_import(ptr)
    }
}

/// One submission's worth of recorded work and the pooled buffers it
/// holds.
struct Batch<'a> {
    be: &'a WgpuBackend,
    lease: Lease<'a>,
    enc: wgpu::CommandEncoder,
    temps: HashMap<u64, Buf>,
}

/// Fails unless `b` holds at least `n` values.
fn need(b: DevBuf, n: usize, what: &str) -> Result<()> {
    if b.len < n {
        return Err(Error::Invalid(format!(
            "GPU backend: {what} needs {n} values, its buffer holds {}",
            b.len
        )));
    }
    Ok(())
}

impl Batch<'_> {
    fn buf(&self, d: DevBuf) -> Result<Buf> {
        match self.temps.get(&d.id) {
            Some(b) if (d.len as u64) * 4 <= b.len => Ok(b.clone()),
            Some(_) => Err(Error::Invalid(format!(
                "GPU backend: batch buffer {} is shorter than {} values",
                d.id, d.len
            ))),
            None => self.be.kept_buf(d),
        }
    }

    fn opt(&self, d: Option<DevBuf>, rw: bool) -> Result<Buf> {
        match d {
            Some(d) => self.buf(d),
            None if rw => Ok(self.be.dummy_rw.clone()),
            None => Ok(self.be.dummy.clone()),
        }
    }

    /// A kernel over `len` values, one per invocation.
    fn flat(&mut self, k: Kernel, bufs: [Buf; 5], q: [u32; 8], len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let grid = self.be.flat_grid(len);
        self.pass(k, bufs, q, grid)
    }

    fn pass(&mut self, k: Kernel, bufs: [Buf; 5], q: [u32; 8], grid: [u32; 3]) -> Result<()> {
        let [a, b, c, d, e] = &bufs;
        self.be
            .ops_pass(&mut self.lease, &mut self.enc, k, [a, b, c, d, e], q, grid)
    }

    /// An in-place kernel over `len` values of `x` with one operand.
    fn simple(
        &mut self,
        k: Kernel,
        x: DevBuf,
        b: Option<DevBuf>,
        len: usize,
        d: usize,
        f0: f32,
    ) -> Result<()> {
        let bufs = [
            self.buf(x)?,
            self.opt(b, false)?,
            self.be.dummy.clone(),
            self.be.dummy_rw.clone(),
            self.be.dummy_rw.clone(),
        ];
        let q = [len as u32, d.max(1) as u32, 0, 0, 0, 0, f0.to_bits(), 0];
        self.flat(k, bufs, q, len)
    }

    fn temp(&mut self, b: Buf, len: usize) -> DevBuf {
        let id = self.be.dev_id();
        self.temps.insert(id, b);
        DevBuf { id, len }
    }
}

impl DeviceBatch for Batch<'_> {
    fn upload(&mut self, data: &[f32]) -> Result<DevBuf> {
        let b = self.be.put_f32(&mut self.lease, data)?;
        Ok(self.temp(b, data.len()))
    }

    fn upload_u32(&mut self, data: &[u32]) -> Result<DevBuf> {
        let b = self
            .be
            .put(&mut self.lease, bytemuck::cast_slice(data), false)?;
        Ok(self.temp(b, data.len()))
    }

    fn scratch(&mut self, len: usize) -> Result<DevBuf> {
        let b = self.be.take(&mut self.lease, Use::Scratch, len as u64 * 4);
        Ok(self.temp(b, len))
    }

    fn zero(&mut self, b: DevBuf, len: usize) -> Result<()> {
        need(b, len, "zeroed values")?;
        if len > 0 {
            let d = self.buf(b)?;
            self.enc.clear_buffer(&d.b, 0, Some(len as u64 * 4));
        }
        Ok(())
    }

    fn copy(
        &mut self,
        src: DevBuf,
        src_off: usize,
        dst: DevBuf,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        need(src, src_off + len, "a copy's source")?;
        need(dst, dst_off + len, "a copy's destination")?;
        if len == 0 {
            return Ok(());
        }
        let (s, d) = (self.buf(src)?, self.buf(dst)?);
        self.enc.copy_buffer_to_buffer(
            &s.b,
            src_off as u64 * 4,
            &d.b,
            dst_off as u64 * 4,
            len as u64 * 4,
        );
        Ok(())
    }

    fn matmul(&mut self, w: &WeightView<'_>, x: DevBuf, n: usize, y: DevBuf) -> Result<()> {
        need(x, n * w.cols, "a product's input")?;
        need(y, n * w.rows, "a product's output")?;
        if n == 0 || w.rows == 0 {
            return Ok(());
        }
        let (xb, yb) = (self.buf(x)?, self.buf(y)?);
        if !self.be.fits(xb.len as usize) || !self.be.fits(yb.len as usize) {
            return Err(gpu_err(
                "a product",
                format!("{n} rows exceed the adapter's binding limit"),
            ));
        }
        let g = self.be.weight(w, &mut self.lease)?;
        self.be
            .encode_matmul(&mut self.lease, &mut self.enc, w, &g, &xb, &yb, n)
    }

    fn gather_rows(
        &mut self,
        w: &WeightView<'_>,
        idx: DevBuf,
        n: usize,
        out: DevBuf,
    ) -> Result<bool> {
        need(idx, n, "the gathered rows' indices")?;
        need(out, n * w.cols, "the gathered rows")?;
        let Some(g) = self.be.resident(w)? else {
            return Ok(false);
        };
        if n > 0 {
            let (ib, ob) = (self.buf(idx)?, self.buf(out)?);
            self.be
                .encode_rows(&mut self.lease, &mut self.enc, w, &g, &ib, &ob, n)?;
        }
        Ok(true)
    }

    fn op(&mut self, op: DevOp) -> Result<()> {
        let f = |v: f32| v.to_bits();
        match op {
            DevOp::Argmax { x, len, out } => {
                need(x, len, "the arg-max's values")?;
                need(out, 1, "the arg-max's index")?;
                let bufs = [
                    self.be.dummy_rw.clone(),
                    self.buf(x)?,
                    self.be.dummy.clone(),
                    self.be.dummy_rw.clone(),
                    self.buf(out)?,
                ];
                let q = [len as u32, 0, 0, 0, 0, 0, 0, 0];
                self.pass(Kernel::Argmax, bufs, q, [1, 1, 1])
            }
            DevOp::RmsNorm { x, w, rows, eps } => {
                need(x, rows * w.len, "RMSNorm")?;
                if rows == 0 {
                    return Ok(());
                }
                if rows > self.be.limits.max_compute_workgroups_per_dimension as usize {
                    return Err(gpu_err("rms_norm", format!("{rows} rows")));
                }
                let bufs = [
                    self.buf(x)?,
                    self.buf(w)?,
                    self.be.dummy.clone(),
                    self.be.dummy_rw.clone(),
                    self.be.dummy_rw.clone(),
                ];
                let q = [0, w.len as u32, 0, 0, 0, 0, f(eps), 0];
                self.pass(Kernel::RmsNorm, bufs, q, [rows as u32, 1, 1])
            }
            DevOp::Rope {
                x,
                cos,
                sin,
                n,
                heads,
                head_dim,
                rot_dim,
                interleaved,
            } => {
                let d = heads * head_dim;
                need(x, n * d, "rope")?;
                need(cos, n * (rot_dim / 2), "rope's cosines")?;
                need(sin, n * (rot_dim / 2), "rope's sines")?;
                if rot_dim > head_dim || n == 0 {
                    return if n == 0 {
                        Ok(())
                    } else {
                        Err(Error::Invalid(format!(
                            "rope of {rot_dim} dimensions in heads of {head_dim}"
                        )))
                    };
                }
                let bufs = [
                    self.buf(x)?,
                    self.buf(cos)?,
                    self.buf(sin)?,
                    self.be.dummy_rw.clone(),
                    self.be.dummy_rw.clone(),
                ];
                let q = [
                    0,
                    d as u32,
                    heads as u32,
                    head_dim as u32,
                    rot_dim as u32,
                    interleaved as u32,
                    0,
                    0,
                ];
                self.pass(Kernel::Rope, bufs, q, [1, n as u32, 1])
            }
            DevOp::Attention {
                q,
                k,
                v,
                out,
                scores,
                n,
                pos0,
                heads,
                kv_heads,
                head_dim,
                scale,
                window,
                chunk,
            } => {
                let keys = pos0 + n;
                if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
                    return Err(Error::Invalid(format!(
                        "attention of {heads} heads over {kv_heads} key/value heads"
                    )));
                }
                need(q, n * heads * head_dim + heads, "attention's queries")?;
                need(k, keys * kv_heads * head_dim, "the key cache")?;
                need(v, keys * kv_heads * head_dim, "the value cache")?;
                need(out, n * heads * head_dim, "attention's output")?;
                need(scores, n * heads * keys, "attention's scores")?;
                if n == 0 {
                    return Ok(());
                }
                let bufs = [
                    self.buf(q)?,
                    self.buf(k)?,
                    self.buf(v)?,
                    self.buf(out)?,
                    self.buf(scores)?,
                ];
                let p = [
                    pos0 as u32,
                    keys as u32,
                    heads as u32,
                    head_dim as u32,
                    kv_heads as u32,
                    window as u32,
                    f(scale),
                    chunk as u32,
                ];
                self.pass(Kernel::Attention, bufs, p, [heads as u32, n as u32, 1])
            }
            DevOp::Swiglu { g, u, len } | DevOp::ClampedSwiglu { g, u, len, .. } => {
                need(g, len, "the gate")?;
                need(u, len, "the up projection")?;
                let (k, q) = match op {
                    DevOp::ClampedSwiglu { alpha, limit, .. } => (
                        Kernel::ClampedSwiglu,
                        [len as u32, 0, 0, 0, 0, 0, f(alpha), f(limit)],
                    ),
                    _ => (Kernel::Swiglu, [len as u32, 0, 0, 0, 0, 0, 0, 0]),
                };
                let bufs = [
                    self.buf(g)?,
                    self.buf(u)?,
                    self.be.dummy.clone(),
                    self.be.dummy_rw.clone(),
                    self.be.dummy_rw.clone(),
                ];
                self.flat(k, bufs, q, len)
            }
            DevOp::Axpy {
                y,
                x,
                rows,
                d,
                idx,
                coef,
                sigmoid,
            } => {
                need(x, rows * d, "an added row")?;
                if idx.is_none() {
                    need(y, rows * d, "an accumulated row")?;
                }
                if let Some(i) = idx {
                    need(i, rows, "the rows' destinations")?;
                }
                if let Some(c) = coef {
                    need(c, rows, "the rows' coefficients")?;
                }
                let flags = idx.is_some() as u32
                    | (coef.is_some() as u32) << 1
                    | ((sigmoid && coef.is_some()) as u32) << 2;
                let bufs = [
                    self.buf(y)?,
                    self.buf(x)?,
                    self.opt(coef, false)?,
                    self.be.dummy_rw.clone(),
                    self.opt(idx, true)?,
                ];
                let q = [(rows * d) as u32, d as u32, flags, 0, 0, 0, 0, 0];
                self.flat(Kernel::Axpy, bufs, q, rows * d)
            }
            DevOp::Gather {
                x,
                idx,
                scale,
                out,
                rows,
                d,
            } => {
                need(out, rows * d, "gathered rows")?;
                need(idx, rows, "the gathered rows' sources")?;
                if let Some(s) = scale {
                    need(s, rows, "the gathered rows' scales")?;
                }
                let flags = (scale.is_some() as u32) << 1;
                let bufs = [
                    self.buf(out)?,
                    self.buf(x)?,
                    self.opt(scale, false)?,
                    self.be.dummy_rw.clone(),
                    self.buf(idx)?,
                ];
                let q = [(rows * d) as u32, d as u32, flags, 0, 0, 0, 0, 0];
                self.flat(Kernel::Gather, bufs, q, rows * d)
            }
            DevOp::AddRows { x, b, rows } => {
                need(x, rows * b.len, "biased rows")?;
                self.simple(Kernel::AddRows, x, Some(b), rows * b.len, b.len, 0.0)
            }
            DevOp::Clamp { x, len, limit } => {
                need(x, len, "clamped values")?;
                self.simple(Kernel::Clamp, x, None, len, 0, limit)
            }
            DevOp::SigmoidMul { x, g, len } => {
                need(x, len, "gated values")?;
                need(g, len, "the gates")?;
                self.simple(Kernel::SigmoidMul, x, Some(g), len, 0, 0.0)
            }
            DevOp::ConvStep {
                hist,
                x,
                w,
                out,
                n,
                channels,
                kernel,
            } => {
                if kernel < 2 {
                    return Err(Error::Invalid(format!("a conv of width {kernel}")));
                }
                need(hist, channels * (kernel - 1), "the conv history")?;
                need(x, n * channels, "the conv's input")?;
                need(w, channels * kernel, "the conv's weights")?;
                need(out, n * channels, "the conv's output")?;
                let bufs = [
                    self.buf(hist)?,
                    self.buf(x)?,
                    self.buf(w)?,
                    self.buf(out)?,
                    self.be.dummy_rw.clone(),
                ];
                let q = [n as u32, channels as u32, kernel as u32, 0, 0, 0, 0, 0];
                self.flat(Kernel::ConvStep, bufs, q, channels)
            }
            DevOp::DeltaRule {
                state,
                qkv,
                params,
                out,
                n,
                k_heads,
                v_heads,
                k_dim,
                v_dim,
                tiled,
                scale,
            } => {
                if k_heads == 0 || !v_heads.is_multiple_of(k_heads) {
                    return Err(Error::Invalid(format!(
                        "{v_heads} value heads over {k_heads} key heads"
                    )));
                }
                need(state, v_heads * k_dim * v_dim, "the recurrent state")?;
                need(
                    qkv,
                    n * (2 * k_heads * k_dim + v_heads * v_dim),
                    "q, k and v",
                )?;
                need(
                    params,
                    2 * n * v_heads + 2 * v_heads,
                    "β, the decay and biases",
                )?;
                need(out, n * v_heads * v_dim, "the recurrence's output")?;
                if n == 0 || v_heads == 0 {
                    return Ok(());
                }
                let bufs = [
                    self.buf(state)?,
                    self.buf(qkv)?,
                    self.buf(params)?,
                    self.buf(out)?,
                    self.be.dummy_rw.clone(),
                ];
                let q = [
                    n as u32,
                    v_heads as u32,
                    k_heads as u32,
                    k_dim as u32,
                    v_dim as u32,
                    tiled as u32,
                    f(scale),
                    0,
                ];
                self.pass(Kernel::DeltaRule, bufs, q, [v_heads as u32, 1, 1])
            }
            DevOp::ScaleRows { x, s, rows, d } => {
                need(x, rows * d, "scaled rows")?;
                need(s, rows, "the rows' scales")?;
                self.simple(Kernel::ScaleRows, x, Some(s), rows * d, d, 0.0)
            }
        }
    }

    fn submit(self: Box<Self>, reads: &mut [(DevBuf, usize, &mut [f32])]) -> Result<()> {
        let this = *self;
        let mut bufs = Vec::with_capacity(reads.len());
        for (d, off, out) in reads.iter() {
            need(*d, off + out.len(), "a read-back")?;
            bufs.push(this.buf(*d)?);
        }
        let mut r: Vec<(&Buf, u64, &mut [u8])> = bufs
            .iter()
            .zip(reads.iter_mut())
            .map(|(b, (_, off, out))| (b, *off as u64 * 4, bytemuck::cast_slice_mut(out)))
            .collect();
        this.be.finish(this.lease, this.enc, &mut r)
    }
}
