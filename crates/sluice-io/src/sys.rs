//! Process memory as the kernel accounts it: resident set, memory cgroup
//! limits, and the page cache of model files.
//!
//! sluice promises to stay under a RAM cap; these are the numbers that check
//! it from outside the allocator (page cache charged to our cgroup included).

use std::path::{Path, PathBuf};

use sluice_core::{Error, Result};

/// Limits at or above this (2^62) mean "no limit": cgroup v1 reports an
/// unlimited group as a huge page-rounded number instead of a word.
const UNLIMITED: u64 = 1 << 62;

#[cfg(any(target_os = "linux", target_os = "android"))]
fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kb(&status, field)
}

fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
        Some(kb * 1024)
    })
}

/// What [`peak_rss_bytes`] and [`rss_bytes`] measure on this platform, for
/// reports: the figure the OS itself holds a process to.
pub fn memory_measure() -> &'static str {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        "VmHWM/VmRSS (/proc/self/status)"
    } else if cfg!(target_vendor = "apple") {
        "phys_footprint (task_info TASK_VM_INFO), what iOS's memory limit counts"
    } else if cfg!(windows) {
        "working set (GetProcessMemoryInfo)"
    } else {
        "none on this platform"
    }
}

/// Peak resident set size of this process (`VmHWM`; on Apple's systems
/// the peak physical footprint, on Windows the peak working set), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return status_kb("VmHWM");
    #[cfg(target_vendor = "apple")]
    return darwin::footprint().map(|f| f.1);
    #[cfg(windows)]
    return windows::working_set().map(|w| w.1);
    #[allow(unreachable_code)]
    None
}

/// Current resident set size of this process (`VmRSS`; on Apple's systems
/// the physical footprint, on Windows the working set), in bytes.
pub fn rss_bytes() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return status_kb("VmRSS");
    #[cfg(target_vendor = "apple")]
    return darwin::footprint().map(|f| f.0);
    #[cfg(windows)]
    return windows::working_set().map(|w| w.0);
    #[allow(unreachable_code)]
    None
}

/// Memory the kernel could give without swapping (`MemAvailable`; on iOS
/// what the app may still allocate, on macOS free plus inactive pages, on
/// Windows available physical memory), bytes.
pub fn mem_available_bytes() -> Option<u64> {
    #[cfg(target_vendor = "apple")]
    return darwin::available();
    #[cfg(windows)]
    return windows::available();
    #[allow(unreachable_code)]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_status_kb(&meminfo, "MemAvailable")
    }
}

/// Windows' accounting: the process's working set and its peak, and the
/// physical memory the system reports available. Built here, run under
/// Wine at most: no Windows machine.
#[cfg(windows)]
mod windows {
    use windows_sys::Win32::System::ProcessStatus::{
        GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS,
    };
    use windows_sys::Win32::System::SystemInformation::{GlobalMemoryStatusEx, MEMORYSTATUSEX};
    use windows_sys::Win32::System::Threading::GetCurrentProcess;

    /// (working set, peak working set), bytes.
    pub fn working_set() -> Option<(u64, u64)> {
        // SAFETY: plain data; zero is a valid initial state.
        let mut c: PROCESS_MEMORY_COUNTERS = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32;
        c.cb = size;
        // SAFETY: the pseudo-handle of this process and a counters struct of the size given.
        let ok = unsafe { GetProcessMemoryInfo(GetCurrentProcess(), &mut c, size) };
        (ok != 0).then_some((c.WorkingSetSize as u64, c.PeakWorkingSetSize as u64))
    }

    /// Physical memory available, bytes.
    pub fn available() -> Option<u64> {
        // SAFETY: plain data; dwLength set as the call requires.
        let mut m: MEMORYSTATUSEX = unsafe { std::mem::zeroed() };
        m.dwLength = std::mem::size_of::<MEMORYSTATUSEX>() as u32;
        // SAFETY: a struct of the length given.
        let ok = unsafe { GlobalMemoryStatusEx(&mut m) };
        (ok != 0).then_some(m.ullAvailPhys)
    }
}

/// The leading fields of `struct task_vm_info` (mach/task_info.h) up
/// to `ledger_phys_footprint_peak` (revision 3); the kernel fills as
/// many as the count passed allows.
#[cfg(any(target_vendor = "apple", test))]
#[repr(C)]
#[derive(Default)]
struct TaskVmInfo {
    virtual_size: u64,
    region_count: i32,
    page_size: i32,
    resident_size: u64,
    resident_size_peak: u64,
    device: u64,
    device_peak: u64,
    internal: u64,
    internal_peak: u64,
    external: u64,
    external_peak: u64,
    reusable: u64,
    reusable_peak: u64,
    purgeable_volatile_pmap: u64,
    purgeable_volatile_resident: u64,
    purgeable_volatile_virtual: u64,
    compressed: u64,
    compressed_peak: u64,
    compressed_lifetime: u64,
    phys_footprint: u64,
    min_address: u64,
    max_address: u64,
    ledger_phys_footprint_peak: i64,
}

/// (footprint now, peak footprint) from a `task_vm_info` the kernel filled
/// `words` 32-bit words of: `phys_footprint` needs revision 1 (38 words),
/// `ledger_phys_footprint_peak` revision 3 (44); before that the peak
/// resident size stands in for the peak.
#[cfg(any(target_vendor = "apple", test))]
fn footprint_of(info: &TaskVmInfo, words: u32) -> Option<(u64, u64)> {
    let filled = |end: usize| words as usize * 4 >= end;
    let fp_end = std::mem::offset_of!(TaskVmInfo, phys_footprint) + 8;
    let peak_end = std::mem::offset_of!(TaskVmInfo, ledger_phys_footprint_peak) + 8;
    if !filled(fp_end) {
        return None;
    }
    let peak = if filled(peak_end) && info.ledger_phys_footprint_peak > 0 {
        info.ledger_phys_footprint_peak as u64
    } else {
        info.resident_size_peak
    };
    Some((info.phys_footprint, peak.max(info.phys_footprint)))
}

/// Apple's accounting: the Mach task's physical footprint (what jetsam and
/// iOS's per-app limit count, page cache excluded) and the host's free
/// pages. Built and type-checked here, not run: no Apple machine.
#[cfg(target_vendor = "apple")]
mod darwin {
    /// `TASK_VM_INFO` flavor.
    const TASK_VM_INFO: libc::task_flavor_t = 22;

    /// (footprint now, peak footprint), bytes.
    // libc marks the Mach port calls deprecated in favour of the mach2
    // crate; two calls do not justify another dependency.
    #[allow(deprecated)]
    pub fn footprint() -> Option<(u64, u64)> {
        let mut info = super::TaskVmInfo::default();
        let mut count =
            (std::mem::size_of::<super::TaskVmInfo>() / 4) as libc::mach_msg_type_number_t;
        // SAFETY: `info` is a writable buffer of `count` 32-bit words laid
        // out as the kernel's task_vm_info; the task port is our own.
        let kr = unsafe {
            libc::task_info(
                libc::mach_task_self(),
                TASK_VM_INFO,
                &mut info as *mut super::TaskVmInfo as libc::task_info_t,
                &mut count,
            )
        };
        if kr != libc::KERN_SUCCESS {
            return None;
        }
        super::footprint_of(&info, count)
    }

    /// On iOS, what this app may still allocate before the system ends it
    /// (`os_proc_available_memory`, iOS 13 and later); elsewhere free plus
    /// inactive pages of the host, bytes.
    #[allow(deprecated)]
    pub fn available() -> Option<u64> {
        #[cfg(target_os = "ios")]
        {
            unsafe extern "C" {
                fn os_proc_available_memory() -> usize;
            }
            // SAFETY: takes nothing and only reads the task's ledger.
            let n = unsafe { os_proc_available_memory() };
            if n > 0 {
                return Some(n as u64);
            }
        }
        // SAFETY: zeroed plain-old-data the kernel overwrites.
        let mut st: libc::vm_statistics64 = unsafe { std::mem::zeroed() };
        let mut count = libc::HOST_VM_INFO64_COUNT;
        // SAFETY: `st` has room for HOST_VM_INFO64_COUNT words; the host port is ours.
        let kr = unsafe {
            libc::host_statistics64(
                libc::mach_host_self(),
                libc::HOST_VM_INFO64,
                &mut st as *mut libc::vm_statistics64 as libc::host_info64_t,
                &mut count,
            )
        };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        (kr == libc::KERN_SUCCESS && page > 0)
            .then(|| (st.free_count as u64 + st.inactive_count as u64) * page as u64)
    }
}

/// Which cgroup hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hierarchy {
    /// The unified hierarchy (`memory.max`).
    V2,
    /// The v1 `memory` controller (`memory.limit_in_bytes`).
    V1,
}

impl Hierarchy {
    fn limit_file(self) -> &'static str {
        match self {
            Hierarchy::V2 => "memory.max",
            Hierarchy::V1 => "memory.limit_in_bytes",
        }
    }
}

/// This process's cgroup path in hierarchy `h`, from `/proc/self/cgroup`
/// (`0::PATH` for v2, `N:...,memory,...:PATH` for v1).
fn own_cgroup(proc_cgroup: &str, h: Hierarchy) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let matches = match h {
            Hierarchy::V2 => id == "0" && controllers.is_empty(),
            Hierarchy::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        matches.then(|| path.to_string())
    })
}

/// Where hierarchy `h` is mounted, and which cgroup is its mount's root
/// (not `/` inside some containers), from `/proc/self/mountinfo`.
fn mount_of(mountinfo: &str, h: Hierarchy) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let pre: Vec<&str> = pre.split(' ').collect();
        let mut post = post.split(' ');
        let fstype = post.next()?;
        let _source = post.next()?;
        let superopts = post.next().unwrap_or("");
        let ok = match h {
            Hierarchy::V2 => fstype == "cgroup2",
            Hierarchy::V1 => fstype == "cgroup" && superopts.split(',').any(|o| o == "memory"),
        };
        if !ok || pre.len() < 5 {
            return None;
        }
        Some((
            unescape_mount(pre[3]),
            PathBuf::from(unescape_mount(pre[4])),
        ))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of this process's memory cgroup in hierarchy `h`, and the
/// mount point (the highest ancestor we can see).
fn cgroup_dir(h: Hierarchy) -> Option<(PathBuf, PathBuf)> {
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let own = own_cgroup(&proc_cgroup, h)?;
    let (root, mount) = mount_of(&mountinfo, h)?;
    let rel = own
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(&own)
        .trim_start_matches('/');
    let dir = mount.join(rel);
    // With a cgroup namespace or a bind-mounted subtree the path may not
    // resolve; then the mount itself is our cgroup as far as we can see.
    let dir = if dir.is_dir() { dir } else { mount.clone() };
    Some((dir, mount))
}

/// Reads a limit file: `max` or a huge value is "unlimited" (`None`).
fn read_limit(path: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let v = s.trim().parse::<u64>().ok()?;
    (v < UNLIMITED).then_some(v)
}

/// The tightest limit on `dir` and its ancestors up to `mount`.
fn min_limit_upwards(dir: &Path, mount: &Path, file: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if let Some(v) = read_limit(&d.join(file)) {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
        if d == mount {
            break;
        }
        cur = d.parent().filter(|p| p.starts_with(mount));
    }
    best
}

/// The memory limit of the cgroup this process is in, in bytes: the smallest
/// of its own and its ancestors' limits, in the v2 hierarchy (`memory.max`)
/// and the v1 memory controller (`memory.limit_in_bytes`). `None` when
/// unlimited or unknown.
pub fn memory_cgroup_limit() -> Option<u64> {
    [Hierarchy::V2, Hierarchy::V1]
        .into_iter()
        .filter_map(|h| {
            let (dir, mount) = cgroup_dir(h)?;
            min_limit_upwards(&dir, &mount, h.limit_file())
        })
        .min()
}

/// Creates a child memory cgroup `sluice-<pid>` under this process's current
/// one, limits it to `limit` bytes and moves this process into it; returns its
/// directory. Everything the process then charges (heap, and the page cache
/// its reads bring in) counts against `limit`.
///
/// Prefers the v2 hierarchy when it has the memory controller, else the v1
/// memory controller. Needs permission to create cgroups (root, or a
/// delegated subtree); fails with [`Error::Unsupported`] saying what was
/// refused otherwise. The cgroup is left behind when the process exits
/// (remove it with `rmdir`).
pub fn enter_memory_cgroup(limit: u64) -> Result<PathBuf> {
    if !cfg!(target_os = "linux") {
        return Err(Error::Unsupported(format!(
            "memory cgroups are a Linux feature; {} has none (with direct reads sluice's own accounting holds the cap, and mmap or buffered runs cannot be capped here)",
            std::env::consts::OS
        )));
    }
    let h = if cgroup_dir(Hierarchy::V2).is_some_and(|(dir, _)| has_v2_memory(&dir)) {
        Hierarchy::V2
    } else if cgroup_dir(Hierarchy::V1).is_some() {
        Hierarchy::V1
    } else {
        return Err(Error::Unsupported(
            "no memory cgroup found (neither a cgroup v2 hierarchy with the memory controller nor a v1 memory controller is mounted)".into(),
        ));
    };
    let (parent, _) = cgroup_dir(h).expect("checked above");
    let pid = std::process::id();
    let dir = parent.join(format!("sluice-{pid}"));
    let refused = |what: &str, path: &Path, e: std::io::Error| {
        Error::Unsupported(format!(
            "cannot {what} {} ({e}); creating a memory cgroup needs root or a delegated cgroup",
            path.display()
        ))
    };
    if h == Hierarchy::V2 {
        // Children only get memory.max if the parent delegates the
        // controller; that may already be so, and writing it again is
        // harmless.
        let ctl = parent.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&ctl)
            .map(|s| s.split_whitespace().any(|c| c == "memory"))
            .unwrap_or(false);
        if !enabled {
            std::fs::write(&ctl, "+memory").map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    Error::Unsupported(format!(
                        "cannot enable the memory controller in {} ({e}): cgroup v2 only allows it on a cgroup without processes of its own; start sluice in a dedicated cgroup (e.g. `systemd-run --scope -p MemoryMax=...`)",
                        ctl.display()
                    ))
                } else {
                    refused("enable the memory controller in", &ctl, e)
                }
            })?;
        }
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(refused("create cgroup", &dir, e)),
    }
    let limit_file = dir.join(h.limit_file());
    std::fs::write(&limit_file, limit.to_string())
        .map_err(|e| refused("set the memory limit in", &limit_file, e))?;
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string())
        .map_err(|e| refused("move this process into", &procs, e))?;
    Ok(dir)
}

fn has_v2_memory(dir: &Path) -> bool {
    // A cgroup's own controllers file lists what its parent delegates to it,
    // i.e. what we could enable for a child.
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().any(|c| c == "memory"))
        .unwrap_or(false)
}

/// Asks the kernel to drop `path`'s pages from the page cache
/// (`POSIX_FADV_DONTNEED`), so that a benchmark reads from the drive. Dirty
/// pages are not dropped: write-back first if the file was just written.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn drop_page_cache(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: a valid open descriptor; the call only changes cache state.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::io(path, std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Elsewhere no call drops one file's cached pages: cold runs need the
/// OS's own purge (`sudo purge` on macOS).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn drop_page_cache(path: &Path) -> Result<()> {
    Err(Error::Unsupported(format!(
        "{}: dropping one file's cached pages needs posix_fadvise, which {} lacks; purge the cache by hand for a cold run",
        path.display(),
        std::env::consts::OS
    )))
}

/// Bytes of `path` resident in the page cache: unknown on Windows (no
/// `mincore`).
#[cfg(not(unix))]
pub fn page_cache_resident(_: &Path) -> Option<u64> {
    None
}

/// Bytes of `path` resident in the page cache (`mincore(2)` over a map of
/// it), or `None` if it cannot be mapped.
#[cfg(unix)]
pub fn page_cache_resident(path: &Path) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len == 0 {
        return Some(0);
    }
    // SAFETY: the map is never read (mincore does not fault pages in), so concurrent changes to the file cannot hurt.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = if page > 0 { page as usize } else { 4096 };
    let pages = map.len().div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the map is page aligned and `len` bytes long, and `vec` has one byte per page of it, as mincore requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr() as *mut _,
        )
    };
    if rc != 0 {
        return None;
    }
    let resident = vec.iter().filter(|&&v| v & 1 != 0).count() as u64 * page as u64;
    Some(resident.min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn parses_status() {
        let s = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status_kb(s, "VmHWM"), Some(2 << 20));
        assert_eq!(parse_status_kb(s, "VmRSS"), Some(1 << 20));
        assert_eq!(parse_status_kb(s, "VmSwap"), None);
        assert!(peak_rss_bytes().unwrap() > 0);
        assert!(rss_bytes().unwrap() > 0);
        // From one snapshot: other test threads allocate between two reads.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let peak = parse_status_kb(&status, "VmHWM").unwrap();
        let now = parse_status_kb(&status, "VmRSS").unwrap();
        assert!(now > 0 && peak >= now, "{peak} {now}");
    }

    #[test]
    fn reads_task_vm_info_by_revision() {
        // The layout of XNU's task_vm_info: revision 1 ends after
        // phys_footprint (38 words), revision 3 after the ledger peak (44).
        assert_eq!(std::mem::offset_of!(TaskVmInfo, phys_footprint), 144);
        assert_eq!(std::mem::size_of::<TaskVmInfo>(), 44 * 4);
        let info = TaskVmInfo {
            resident_size_peak: 50,
            phys_footprint: 40,
            ledger_phys_footprint_peak: 70,
            ..TaskVmInfo::default()
        };
        assert_eq!(footprint_of(&info, 36), None);
        assert_eq!(footprint_of(&info, 38), Some((40, 50)));
        assert_eq!(footprint_of(&info, 42), Some((40, 50)));
        assert_eq!(footprint_of(&info, 44), Some((40, 70)));
        let low = TaskVmInfo {
            resident_size_peak: 10,
            ..info
        };
        assert_eq!(footprint_of(&low, 38), Some((40, 40)));
    }

    #[test]
    fn parses_cgroup_files() {
        let pc = "12:cpu,cpuacct:/\n4:memory:/a/b\n0::/user.slice/x\n";
        assert_eq!(own_cgroup(pc, Hierarchy::V1).as_deref(), Some("/a/b"));
        assert_eq!(
            own_cgroup(pc, Hierarchy::V2).as_deref(),
            Some("/user.slice/x")
        );
        let mi = "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                  31 25 0:27 /ns /sys/fs/cgroup/un\\040ified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_of(mi, Hierarchy::V1),
            Some(("/".into(), PathBuf::from("/sys/fs/cgroup/memory")))
        );
        assert_eq!(
            mount_of(mi, Hierarchy::V2),
            Some(("/ns".into(), PathBuf::from("/sys/fs/cgroup/un ified")))
        );
    }

    #[test]
    fn limit_walks_up() {
        let root = std::env::temp_dir().join(format!("sluice-cg-{}", std::process::id()));
        let child = root.join("a").join("b");
        std::fs::create_dir_all(&child).unwrap();
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("a").join("memory.max"), "1000\n").unwrap();
        std::fs::write(child.join("memory.max"), "5000\n").unwrap();
        assert_eq!(min_limit_upwards(&child, &root, "memory.max"), Some(1000));
        std::fs::write(root.join("a").join("memory.max"), "9223372036854771712\n").unwrap();
        assert_eq!(min_limit_upwards(&child, &root, "memory.max"), Some(5000));
        std::fs::write(child.join("memory.max"), "max\n").unwrap();
        assert_eq!(min_limit_upwards(&child, &root, "memory.max"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn page_cache_residency_and_drop() {
        let path = std::env::temp_dir().join(format!("sluice-pc-{}", std::process::id()));
        let data = vec![7u8; 1 << 20];
        std::fs::write(&path, &data).unwrap();
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), data.len());
        let before = page_cache_resident(&path).unwrap();
        drop_page_cache(&path).unwrap();
        let after = page_cache_resident(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(before > 0, "file just read should be cached");
        assert!(
            after < before,
            "dropping the cache freed nothing: {before} -> {after}"
        );
    }

    /// Runs `child_enters_cgroup` in a child process (moving this test process
    /// into a cgroup would affect every other test) and removes the cgroup.
    #[test]
    fn enter_memory_cgroup_in_child() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "sys::tests::child_enters_cgroup",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SLUICE_IO_CGROUP_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The harness prints the test name on the same line as our output.
        if let Some((_, dir)) = stdout.lines().find_map(|l| l.split_once("CGROUP ")) {
            let dir = PathBuf::from(dir.trim());
            // Empty once the child exited.
            let _ = std::fs::remove_dir(&dir);
        } else {
            assert!(stdout.contains("SKIPPED"), "{stdout}");
            eprintln!("enter_memory_cgroup not permitted here; only the refusal was tested");
        }
    }

    #[test]
    fn child_enters_cgroup() {
        if std::env::var_os("SLUICE_IO_CGROUP_CHILD").is_none() {
            return;
        }
        let limit = 3u64 << 30;
        match enter_memory_cgroup(limit) {
            Ok(dir) => {
                println!("CGROUP {}", dir.display());
                let mine = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
                assert!(mine.lines().any(|l| l == std::process::id().to_string()));
                assert_eq!(
                    read_limit(&dir.join(Hierarchy::V1.limit_file()))
                        .or_else(|| read_limit(&dir.join(Hierarchy::V2.limit_file()))),
                    Some(limit)
                );
                let seen = memory_cgroup_limit().expect("a limit is in force");
                assert!(seen <= limit, "{seen} > {limit}");
            }
            Err(e) => {
                assert!(matches!(e, Error::Unsupported(_)), "{e}");
                println!("SKIPPED {e}");
            }
        }
    }
}
