//! Device profiles: TOML files in which every figure carries its public
//! source and, where it is uncertain, the range the simulator can sweep.

use serde::Deserialize;
use sluice_core::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One figure: its value, where it comes from, and how sure it is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    /// The value, in the unit the key names.
    pub value: f64,
    /// Public source (URL) or `estimate: ...` with the reasoning.
    #[serde(default)]
    pub source: String,
    /// Plausible `[low, high]` when the figure is uncertain.
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// Remarks.
    #[serde(default)]
    pub note: Option<String>,
}

impl Figure {
    /// A figure with a source and no uncertainty.
    pub fn new(value: f64, source: impl Into<String>) -> Figure {
        Figure {
            value,
            source: source.into(),
            range: None,
            note: None,
        }
    }
}

/// Memory of the device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Installed RAM, GB (1e9 bytes).
    pub total_gb: Figure,
    /// What one process may use, GB: the default RAM cap on this device.
    pub app_gb: Figure,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbps: Figure,
    /// Resident memory of the process outside the model, MB.
    pub process_mb: Figure,
    /// memcpy rate out of the page cache, GB/s (default: half the
    /// bandwidth, a read and a write per byte).
    #[serde(default)]
    pub copy_gbps: Option<Figure>,
}

/// Flash storage.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flash {
    /// Sustained read bandwidth of multi-hundred-KB random reads, GB/s.
    pub read_gbps: Figure,
    /// Latency of one read at queue depth 1, µs.
    pub latency_us: Figure,
    /// Reads served in parallel.
    pub queue_depth: Figure,
}

/// The unit that runs the forward pass.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compute {
    /// `cpu` or `gpu`.
    pub unit: String,
    /// Weight bytes per second of a quantized matrix-vector product.
    pub matvec_gbps: Figure,
    /// Per weight format (`Q4_0`, `Q8_0`, `F32`, `mlx4`, ...), where
    /// measured; others use `matvec_gbps`.
    #[serde(default)]
    pub matvec_gbps_by_quant: BTreeMap<String, Figure>,
    /// Arithmetic peak, TFLOPS: prefill's batched products and attention.
    pub tflops: Figure,
    /// Fixed cost of each matrix product (dispatch, threads), µs.
    #[serde(default)]
    pub op_overhead_us: Option<Figure>,
    /// Fixed cost of each layer (norms, rotary, routing, sync), µs.
    pub layer_overhead_us: Figure,
    /// GPUs: one host-device round trip, µs: submitting a command buffer
    /// and waiting until it completes, with no work in it.
    #[serde(default)]
    pub sync_us: Option<Figure>,
    /// GPUs: how many such round trips per layer `layer_overhead_us`
    /// already holds (the engine its figure was derived from).
    #[serde(default)]
    pub layer_syncs: Option<Figure>,
}

/// A device: memory, flash and compute.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Short name (`iphone-17-pro`).
    pub name: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
    /// Memory.
    pub memory: Memory,
    /// Flash.
    pub flash: Flash,
    /// Compute.
    pub compute: Compute,
    /// Where this profile was read from (`builtin:NAME` for built-ins).
    #[serde(skip)]
    pub origin: String,
}

/// The profiles that ship with sluice, by name.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "iphone-17-pro",
        include_str!("../profiles/iphone-17-pro.toml"),
    ),
    (
        "macbook-pro-m3-max-48gb",
        include_str!("../profiles/macbook-pro-m3-max-48gb.toml"),
    ),
    ("dev-vm", include_str!("../profiles/dev-vm.toml")),
];

/// The device name that means the machine sluice runs on.
pub const HOST: &str = "host";

/// Where the machine's own profile is kept: `$SLUICE_HOST_PROFILE` if set,
/// else `host.toml` in sluice's cache directory (`$SLUICE_CACHE_DIR`, or
/// the platform's user cache: `$XDG_CACHE_HOME/sluice`, `~/.cache/sluice`,
/// `~/Library/Caches/sluice` on Apple's systems, `%LOCALAPPDATA%\sluice` on
/// Windows). `None` when no such directory can be named.
pub fn host_profile_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_HOST_PROFILE") {
        return Some(PathBuf::from(p));
    }
    cache_dir().map(|d| d.join("host.toml"))
}

/// sluice's cache directory (see [`host_profile_path`]).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("SLUICE_CACHE_DIR") {
        return Some(d);
    }
    if cfg!(windows) {
        return var("LOCALAPPDATA").map(|d| d.join("sluice"));
    }
    if cfg!(target_vendor = "apple") {
        return var("HOME").map(|h| h.join("Library/Caches/sluice"));
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("sluice"))
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        format: "device profile",
        msg: msg.into(),
    }
}

impl Profile {
    /// A built-in profile by name, [`HOST`] (this machine's profile at
    /// [`host_profile_path`], which `sluice probe DIR --profile` and the
    /// CLI's `--device host` write), or a TOML file.
    pub fn open(name_or_path: &str) -> Result<Profile> {
        if let Some((n, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Profile::parse(text, Path::new(&format!("builtin:{n}")));
        }
        if name_or_path == HOST {
            let Some(path) = host_profile_path().filter(|p| p.exists()) else {
                return Err(Error::Invalid(format!(
                    "no profile of this machine yet{}: the sluice CLI's `--device host` measures it (drive and kernels, about half a minute) and keeps it there",
                    host_profile_path().map_or(String::new(), |p| format!(" at {}", p.display()))
                )));
            };
            return Profile::open(&path.to_string_lossy());
        }
        let path = PathBuf::from(name_or_path);
        if !path.exists() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(Error::Invalid(format!(
                "no device {name_or_path:?}: neither a built-in profile ({}), {HOST} (this machine) nor a file",
                names.join(", ")
            )));
        }
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.len() > 1 << 20 {
            return Err(bad(&path, "larger than 1 MiB: not a device profile"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Profile::parse(&text, &path)
    }

    /// Parses and checks a profile.
    pub fn parse(text: &str, path: &Path) -> Result<Profile> {
        let mut p: Profile = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            match e.span() {
                Some(s) => {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    bad(path, format!("line {line}: {msg}"))
                }
                None => bad(path, msg),
            }
        })?;
        p.origin = path.display().to_string();
        p.check().map_err(|m| bad(path, m))?;
        Ok(p)
    }

    fn figures(&self) -> Vec<(String, &Figure)> {
        let (m, f, c) = (&self.memory, &self.flash, &self.compute);
        let mut v: Vec<(String, &Figure)> = vec![
            ("memory.total_gb".into(), &m.total_gb),
            ("memory.app_gb".into(), &m.app_gb),
            ("memory.bandwidth_gbps".into(), &m.bandwidth_gbps),
            ("memory.process_mb".into(), &m.process_mb),
            ("flash.read_gbps".into(), &f.read_gbps),
            ("flash.latency_us".into(), &f.latency_us),
            ("flash.queue_depth".into(), &f.queue_depth),
            ("compute.matvec_gbps".into(), &c.matvec_gbps),
            ("compute.tflops".into(), &c.tflops),
            ("compute.layer_overhead_us".into(), &c.layer_overhead_us),
        ];
        if let Some(x) = &m.copy_gbps {
            v.push(("memory.copy_gbps".into(), x));
        }
        if let Some(x) = &c.op_overhead_us {
            v.push(("compute.op_overhead_us".into(), x));
        }
        if let Some(x) = &c.sync_us {
            v.push(("compute.sync_us".into(), x));
        }
        if let Some(x) = &c.layer_syncs {
            v.push(("compute.layer_syncs".into(), x));
        }
        for (q, x) in &c.matvec_gbps_by_quant {
            v.push((format!("compute.matvec_gbps_by_quant.{q}"), x));
        }
        v
    }

    fn check(&self) -> std::result::Result<(), String> {
        let zero_ok = [
            "memory.process_mb",
            "flash.latency_us",
            "compute.layer_overhead_us",
            "compute.op_overhead_us",
            "compute.layer_syncs",
            "compute.sync_us",
        ];
        for (k, f) in self.figures() {
            let min_ok = if zero_ok.contains(&k.as_str()) {
                f.value >= 0.0
            } else {
                f.value > 0.0
            };
            if !f.value.is_finite() || !min_ok || f.value > 1e9 {
                return Err(format!("{k} = {} is out of range", f.value));
            }
            if let Some([lo, hi]) = f.range {
                if !(lo <= f.value && f.value <= hi) {
                    return Err(format!(
                        "{k} = {} lies outside its own range [{lo}, {hi}]",
                        f.value
                    ));
                }
            }
        }
        if self.compute.sync_us.is_some() != self.compute.layer_syncs.is_some() {
            return Err(
                "compute.sync_us and compute.layer_syncs go together (a round trip's cost and how many of them compute.layer_overhead_us holds)"
                    .into(),
            );
        }
        if self.memory.app_gb.value > self.memory.total_gb.value {
            return Err("memory.app_gb exceeds memory.total_gb".into());
        }
        if !(1.0..=4096.0).contains(&self.flash.queue_depth.value) {
            return Err("flash.queue_depth must be in 1..=4096".into());
        }
        if !["cpu", "gpu"].contains(&self.compute.unit.as_str()) {
            return Err(format!(
                "compute.unit {:?} is neither \"cpu\" nor \"gpu\"",
                self.compute.unit
            ));
        }
        Ok(())
    }

    /// The figures that carry a range, for sweeps and for the report.
    pub fn uncertain(&self) -> Vec<(String, [f64; 2])> {
        self.figures()
            .into_iter()
            .filter_map(|(k, f)| f.range.map(|r| (k, r)))
            .collect()
    }

    /// Bytes the default RAM cap allows: what one process may use.
    pub fn app_bytes(&self) -> u64 {
        (self.memory.app_gb.value * 1e9) as u64
    }

    /// The figures as JSON (value, source, range), for reports.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, f) in self.figures() {
            m.insert(
                k,
                serde_json::json!({"value": f.value, "source": f.source, "range": f.range}),
            );
        }
        serde_json::json!({"name": self.name, "description": self.description,
            "origin": self.origin, "unit": self.compute.unit, "figures": m})
    }

    /// Writes this profile as TOML (for `sluice probe --profile`).
    pub fn to_toml(&self) -> String {
        fn fig(out: &mut String, k: &str, f: &Figure) {
            let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
            out.push_str(&format!("{k} = {{ value = {}", f.value));
            if let Some([lo, hi]) = f.range {
                out.push_str(&format!(", range = [{lo}, {hi}]"));
            }
            out.push_str(&format!(", source = \"{}\"", esc(&f.source)));
            if let Some(n) = &f.note {
                out.push_str(&format!(", note = \"{}\"", esc(n)));
            }
            out.push_str(" }\n");
        }
        let mut s = format!(
            "name = \"{}\"\ndescription = \"{}\"\n\n[memory]\n",
            self.name,
            self.description.replace('"', "'")
        );
        let m = &self.memory;
        fig(&mut s, "total_gb", &m.total_gb);
        fig(&mut s, "app_gb", &m.app_gb);
        fig(&mut s, "bandwidth_gbps", &m.bandwidth_gbps);
        fig(&mut s, "process_mb", &m.process_mb);
        if let Some(c) = &m.copy_gbps {
            fig(&mut s, "copy_gbps", c);
        }
        s.push_str("\n[flash]\n");
        fig(&mut s, "read_gbps", &self.flash.read_gbps);
        fig(&mut s, "latency_us", &self.flash.latency_us);
        fig(&mut s, "queue_depth", &self.flash.queue_depth);
        let c = &self.compute;
        s.push_str(&format!("\n[compute]\nunit = \"{}\"\n", c.unit));
        fig(&mut s, "matvec_gbps", &c.matvec_gbps);
        fig(&mut s, "tflops", &c.tflops);
        if let Some(o) = &c.op_overhead_us {
            fig(&mut s, "op_overhead_us", o);
        }
        fig(&mut s, "layer_overhead_us", &c.layer_overhead_us);
        if let Some(o) = &c.sync_us {
            fig(&mut s, "sync_us", o);
        }
        if let Some(o) = &c.layer_syncs {
            fig(&mut s, "layer_syncs", o);
        }
        if !c.matvec_gbps_by_quant.is_empty() {
            s.push_str("\n[compute.matvec_gbps_by_quant]\n");
            for (q, f) in &c.matvec_gbps_by_quant {
                fig(&mut s, q, f);
            }
        }
        s
    }

    /// Sets a figure by its dotted key (`flash.read_gbps`), for sweeps.
    pub fn set(&mut self, key: &str, value: f64) -> Result<()> {
        let f = match key {
            "memory.app_gb" => &mut self.memory.app_gb,
            "memory.bandwidth_gbps" => &mut self.memory.bandwidth_gbps,
            "flash.read_gbps" => &mut self.flash.read_gbps,
            "flash.latency_us" => &mut self.flash.latency_us,
            "flash.queue_depth" => &mut self.flash.queue_depth,
            "compute.matvec_gbps" => &mut self.compute.matvec_gbps,
            "compute.tflops" => &mut self.compute.tflops,
            "compute.layer_overhead_us" => &mut self.compute.layer_overhead_us,
            _ => return Err(Error::Invalid(format!("no settable figure {key:?}"))),
        };
        f.value = value;
        f.range = None;
        f.source = "set on the command line".into();
        let origin = Path::new(&self.origin).to_path_buf();
        self.check().map_err(|m| bad(&origin, m))
    }
}
