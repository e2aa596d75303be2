//! Host memory the kernels bind in place. On adapters that share the
//! host's RAM, a streamer's expert slots are imported as device buffers
//! (Vulkan's `VK_EXT_external_memory_host`, Metal's no-copy buffers), so a
//! streamed expert is written once, by the drive, and read by the kernels
//! where the drive put it.

use super::{Buf, Chunk, GpuWeight, WgpuBackend};
use sluice_core::{DType, WeightView};

/// A range of host memory imported as a device buffer.
pub(super) struct HostMap {
    len: usize,
    buf: wgpu::Buffer,
}

/// How wgpu sees an imported slot of `len` bytes.
#[cfg(any(
    target_os = "linux",
    target_os = "android",
    windows,
    target_vendor = "apple"
))]
fn slot_desc(len: usize) -> wgpu::BufferDescriptor<'static> {
    wgpu::BufferDescriptor {
        label: Some("host slot"),
        size: len as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    }
}

/// Opens the device for `desc`; on a Vulkan adapter that can import host
/// memory, with that extension enabled. Returns the import alignment when
/// imports are possible.
pub(super) fn open(
    adapter: &wgpu::Adapter,
    desc: &wgpu::DeviceDescriptor<'_>,
    want: bool,
) -> std::result::Result<(wgpu::Device, wgpu::Queue, Option<usize>), wgpu::RequestDeviceError> {
    if want {
        if let Some((d, q, align)) = sys::open(adapter, desc) {
            return Ok((d, q, Some(align)));
        }
    }
    let (d, q) = pollster::block_on(adapter.request_device(desc))?;
    Ok((d, q, None))
}

impl WgpuBackend {
    /// Imports `[ptr, ptr + len)`; see [`sluice_core::DeviceExec::map_host`].
    ///
    /// # Safety
    ///
    /// As `map_host`: the memory outlives the import.
    pub(super) unsafe fn import_host(&self, ptr: *const u8, len: usize) -> bool {
        let Some(align) = self.host_align else {
            return false;
        };
        if len == 0 || !(ptr as usize).is_multiple_of(align) || !len.is_multiple_of(align) {
            return false;
        }
        if self.state.lock().hosts.contains_key(&(ptr as usize)) {
            return true;
        }
        // SAFETY: the caller keeps the memory allocated until `forget_host`.
        let Some(buf) = (unsafe { sys::import(&self.device, ptr, len) }) else {
            return false;
        };
        if self.check().is_err() {
            return false;
        }
        self.state
            .lock()
            .hosts
            .insert(ptr as usize, HostMap { len, buf });
        true
    }

    /// Drops the import at `ptr` and waits until the driver has freed it.
    pub(super) fn forget_import(&self, ptr: *const u8) {
        let Some(m) = self.state.lock().hosts.remove(&(ptr as usize)) else {
            return;
        };
        drop(m);
        // wgpu destroys a buffer a submission still uses once that
        // submission is done (every batch is waited for, so none is).
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
    }

    /// `(buffer, byte offset in it)` of `bytes` when they lie in imported
    /// memory.
    fn host_place(&self, bytes: &[u8]) -> Option<(wgpu::Buffer, usize, usize)> {
        let p = bytes.as_ptr() as usize;
        let st = self.state.lock();
        let (&base, m) = st.hosts.range(..=p).next_back()?;
        (p + bytes.len() <= base + m.len).then(|| (m.buf.clone(), p - base, m.len))
    }

    /// The binding of `len` bytes at `off` of an imported buffer of
    /// `total` bytes: from the aligned offset below, with the bytes before
    /// the data as a word offset for the kernel.
    fn host_buf(&self, b: wgpu::Buffer, off: usize, len: usize, total: usize) -> (Buf, u32) {
        let a = self.limits.min_storage_buffer_offset_alignment.max(4) as usize;
        let fl = off - off % a;
        let end = (off + len).next_multiple_of(4).min(total);
        (
            Buf {
                b,
                off: fl as u64,
                len: (end - fl).max(4) as u64,
            },
            (off - fl) as u32,
        )
    }

    /// `w` bound where it lies in imported host memory, split into chunks
    /// of one binding each; `None` when it does not lie there (or its
    /// layout needs a copy: FP8's expanded scales, data not word-aligned).
    pub(super) fn in_place(&self, w: &WeightView<'_>) -> Option<GpuWeight> {
        if self.state.lock().hosts.is_empty() || matches!(w.dtype, DType::FP8(_)) {
            return None;
        }
        let (db, doff, dtotal) = self.host_place(w.data)?;
        let rb = w.row_bytes();
        let ab = match w.dtype {
            DType::Mlx(q) => q.aux_row_bytes(w.cols),
            _ => 0,
        };
        let aux = match ab {
            0 => None,
            _ => Some([self.host_place(w.scales)?, self.host_place(w.biases)?]),
        };
        let step = self.limits.min_storage_buffer_offset_alignment.max(4) as usize;
        let max = (self.max_binding() as usize).saturating_sub(step);
        if !doff.is_multiple_of(4) || rb == 0 || rb > max || ab > max {
            return None;
        }
        // Chunks start on words, as the copies' buffers do: the kernels
        // read rows at the same alignment either way.
        let k = 4 / gcd(rb, 4);
        let per = (max / rb.max(ab)).min(w.rows.max(1));
        let per = match per < w.rows {
            true => per - per % k,
            false => per,
        };
        if per == 0 {
            return None;
        }
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < w.rows {
            let rows = per.min(w.rows - r0);
            let (wb, wo) = self.host_buf(db.clone(), doff + r0 * rb, rows * rb, dtotal);
            let mut offs = [wo / 4, 0, 0];
            let aux = match &aux {
                Some([(sb, so, st), (bb, bo, bt)]) => {
                    let half = match w.dtype {
                        DType::Mlx(q) => q.scales.bytes(),
                        _ => 4,
                    };
                    let (s, sw) = self.host_buf(sb.clone(), so + r0 * ab, rows * ab, *st);
                    let (b, bw) = self.host_buf(bb.clone(), bo + r0 * ab, rows * ab, *bt);
                    if !(sw as usize).is_multiple_of(half) || !(bw as usize).is_multiple_of(half) {
                        return None;
                    }
                    offs[1] = sw / half as u32;
                    offs[2] = bw / half as u32;
                    Some([s, b])
                }
                None => None,
            };
            chunks.push(Chunk {
                r0,
                rows,
                w: wb,
                aux,
                offs,
            });
            r0 += rows;
        }
        let bytes = (w.data.len() + w.scales.len() + w.biases.len()) as u64;
        self.count(|t| t.weight_bytes_bound += bytes);
        Some(GpuWeight { chunks, bytes })
    }
}

fn gcd(a: usize, b: usize) -> usize {
    match b {
        0 => a,
        _ => gcd(b, a % b),
    }
}

/// Vulkan: `VK_EXT_external_memory_host`.
#[cfg(any(target_os = "linux", target_os = "android", windows))]
mod sys {
    use ash::vk;
    use wgpu::hal::api::Vulkan;

    pub(super) fn open(
        adapter: &wgpu::Adapter,
        desc: &wgpu::DeviceDescriptor<'_>,
    ) -> Option<(wgpu::Device, wgpu::Queue, usize)> {
        let ext = ash::ext::external_memory_host::NAME;
        let (open, align) = {
            // The hal adapter is only queried and asked for a device,
            // which wgpu adopts below.
            // SAFETY: nothing of wgpu's own is destroyed or changed.
            let hal = unsafe { adapter.as_hal::<Vulkan>() }?;
            let caps = hal.physical_device_capabilities();
            if !caps.supports_extension(ext) || caps.properties().api_version < vk::API_VERSION_1_1
            {
                return None;
            }
            let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
            let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut host);
            let inst = hal.shared_instance().raw_instance();
            // SAFETY: a Vulkan 1.1 query on the adapter's own device.
            unsafe { inst.get_physical_device_properties2(hal.raw_physical_device(), &mut props) };
            let align = host.min_imported_host_pointer_alignment as usize;
            if !align.is_power_of_two() {
                return None;
            }
            // The features and limits are the descriptor's, which the
            // adapter offers.
            // SAFETY: the callback only adds an extension the device has.
            let open = unsafe {
                hal.open_with_callback(
                    desc.required_features,
                    &desc.required_limits,
                    &desc.memory_hints,
                    Some(Box::new(move |a| a.extensions.push(ext))),
                )
            }
            .ok()?;
            (open, align)
        };
        // SAFETY: opened from this adapter with the descriptor's features.
        let (d, q) = unsafe { adapter.create_device_from_hal(open, desc) }.ok()?;
        Some((d, q, align))
    }

    /// A storage buffer over `[ptr, ptr + len)`, memory imported from the
    /// host; its Vulkan objects are freed when wgpu drops it.
    ///
    /// # Safety
    ///
    /// The memory stays allocated until wgpu has dropped the buffer.
    pub(super) unsafe fn import(
        device: &wgpu::Device,
        ptr: *const u8,
        len: usize,
    ) -> Option<wgpu::Buffer> {
        let ht = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let hb = {
            // The hal device creates objects wgpu then adopts.
            // SAFETY: none of wgpu's own objects is touched.
            let hal = unsafe { device.as_hal::<Vulkan>() }?;
            if !hal
                .enabled_device_extensions()
                .contains(&ash::ext::external_memory_host::NAME)
            {
                return None;
            }
            let raw = hal.raw_device().clone();
            let emh = ash::ext::external_memory_host::Device::new(
                hal.shared_instance().raw_instance(),
                &raw,
            );
            let mut hp = vk::MemoryHostPointerPropertiesEXT::default();
            // `ptr` is a host allocation of `len` bytes, aligned as the
            // device asks (checked by the caller).
            // SAFETY: a query on that pointer, which the driver only reads.
            let r = unsafe {
                (emh.fp().get_memory_host_pointer_properties_ext)(
                    emh.device(),
                    ht,
                    ptr.cast(),
                    &mut hp,
                )
            };
            if r != vk::Result::SUCCESS {
                return None;
            }
            let mut ext = vk::ExternalMemoryBufferCreateInfo::default().handle_types(ht);
            let info = vk::BufferCreateInfo::default()
                .size(len as u64)
                .usage(vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_SRC)
                .sharing_mode(vk::SharingMode::EXCLUSIVE)
                .push_next(&mut ext);
            // SAFETY: a valid create info on the device.
            let buffer = unsafe { raw.create_buffer(&info, None) }.ok()?;
            // SAFETY: `buffer` was just created on `raw`.
            let req = unsafe { raw.get_buffer_memory_requirements(buffer) };
            let bits = req.memory_type_bits & hp.memory_type_bits;
            let mut imp = vk::ImportMemoryHostPointerInfoEXT::default()
                .handle_type(ht)
                .host_pointer(ptr as *mut std::ffi::c_void);
            let alloc = vk::MemoryAllocateInfo::default()
                .allocation_size(len as u64)
                .memory_type_index(bits.trailing_zeros())
                .push_next(&mut imp);
            let mem = match bits != 0 && req.size <= len as u64 {
                // SAFETY: imports the caller's memory, which outlives it.
                true => unsafe { raw.allocate_memory(&alloc, None) }.ok(),
                false => None,
            };
            // SAFETY: `mem` was allocated for `buffer` above.
            let bound = mem.filter(|&m| unsafe { raw.bind_buffer_memory(buffer, m, 0) }.is_ok());
            let Some(mem) = bound else {
                // SAFETY: neither object was handed to anyone.
                unsafe {
                    if let Some(m) = mem {
                        raw.free_memory(m, None);
                    }
                    raw.destroy_buffer(buffer, None);
                }
                return None;
            };
            let drop_raw = raw.clone();
            let release: wgpu::hal::DropCallback = Box::new(move || {
                // SAFETY: wgpu has dropped the buffer after its last use.
                unsafe {
                    drop_raw.destroy_buffer(buffer, None);
                    drop_raw.free_memory(mem, None);
                }
            });
            // wgpu never destroys the buffer itself; `release` does.
            // SAFETY: `release` runs once wgpu has dropped the buffer.
            unsafe { wgpu::hal::vulkan::Buffer::from_raw_externally_owned(buffer, release) }
        };
        // Created on this device for the usages given.
        // SAFETY: bound to memory, initialised (it is the host's).
        Some(unsafe { device.create_buffer_from_hal::<Vulkan>(hb, &super::slot_desc(len)) })
    }
}

/// Metal: buffers over host memory without a copy (Apple GPUs share it).
#[cfg(target_vendor = "apple")]
mod sys {
    use objc2_metal::{MTLDevice, MTLResourceOptions};
    use wgpu::hal::api::Metal;

    /// Apple's largest page size: no-copy buffers take whole pages.
    const PAGE: usize = 16 << 10;

    pub(super) fn open(
        adapter: &wgpu::Adapter,
        desc: &wgpu::DeviceDescriptor<'_>,
    ) -> Option<(wgpu::Device, wgpu::Queue, usize)> {
        let (d, q) = pollster::block_on(adapter.request_device(desc)).ok()?;
        Some((d, q, PAGE))
    }

    /// # Safety
    ///
    /// The memory stays allocated until wgpu has dropped the buffer.
    pub(super) unsafe fn import(
        device: &wgpu::Device,
        ptr: *const u8,
        len: usize,
    ) -> Option<wgpu::Buffer> {
        let hb = {
            // SAFETY: the hal device only makes a buffer wgpu adopts.
            let hal = unsafe { device.as_hal::<Metal>() }?;
            let p = std::ptr::NonNull::new(ptr as *mut std::ffi::c_void)?;
            // `ptr` is page-aligned, `len` whole pages (checked by the
            // caller).
            // SAFETY: the allocation outlives the buffer (caller's promise).
            let raw = unsafe {
                hal.raw_device()
                    .newBufferWithBytesNoCopy_length_options_deallocator(
                        p,
                        len,
                        MTLResourceOptions::StorageModeShared,
                        None,
                    )
            }?;
            // SAFETY: `raw` is a buffer of `len` bytes on this device.
            unsafe { wgpu::hal::metal::Device::buffer_from_raw(raw, len as u64) }
        };
        // SAFETY: made on this device, over initialised memory.
        Some(unsafe { device.create_buffer_from_hal::<Metal>(hb, &super::slot_desc(len)) })
    }
}

/// Elsewhere: no import.
#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    windows,
    target_vendor = "apple"
)))]
mod sys {
    pub(super) fn open(
        _: &wgpu::Adapter,
        _: &wgpu::DeviceDescriptor<'_>,
    ) -> Option<(wgpu::Device, wgpu::Queue, usize)> {
        None
    }

    pub(super) unsafe fn import(_: &wgpu::Device, _: *const u8, _: usize) -> Option<wgpu::Buffer> {
        None
    }
}
