//! The mmap engine: copies out of a memory map of each file.
//!
//! Always reads through the page cache (there is no direct I/O on a map), and
//! each copy runs synchronously inside [`ReadEngine::submit`] on the calling
//! thread, page faults included. It is the baseline: what reading weights
//! "the usual way" costs.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memmap2::Mmap;
use sluice_core::{Error, Result};

use crate::common::read_error;
use crate::{AlignedBuf, Completion, Done, EngineOptions, FileId, IoKind, ReadEngine, ReadReq};

struct MappedFile {
    path: PathBuf,
    /// `None` for an empty file, which cannot be mapped.
    map: Option<Mmap>,
    len: u64,
}

/// Reads by copying from memory maps. See the [module docs](self).
pub struct MmapEngine {
    files: Vec<MappedFile>,
    ready: VecDeque<Completion>,
    notes: Vec<String>,
    /// Destination buffers handed over by the caller (copies land in them
    /// synchronously, but the contract is the same for every engine).
    bufs: Vec<AlignedBuf>,
}

impl MmapEngine {
    /// An engine with no files open. `opts.direct` does not apply to maps;
    /// asking for it records a note.
    pub fn new(opts: &EngineOptions) -> MmapEngine {
        let mut notes = Vec::new();
        if opts.direct {
            notes.push("mmap always reads through the page cache; O_DIRECT does not apply".into());
        }
        MmapEngine {
            files: Vec::new(),
            ready: VecDeque::new(),
            notes,
            bufs: Vec::new(),
        }
    }

    fn read_one(&self, req: &ReadReq) -> Result<Done> {
        let f = &self.files[req.file];
        let end = req.offset.checked_add(req.len as u64);
        match end {
            Some(end) if end <= f.len => {}
            _ => {
                return Err(read_error(
                    &f.path,
                    req.offset,
                    req.len,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("unexpected end of file: the file has {} bytes", f.len),
                    ),
                ))
            }
        }
        if req.len > 0 {
            let map = f
                .map
                .as_ref()
                .expect("a non-empty range lies in a non-empty file");
            let src = &map[req.offset as usize..req.offset as usize + req.len];
            // SAFETY: the caller of `submit` guarantees dst..dst+cap is valid for writes and exclusively ours; submit checked cap >= len. The source is our private map, so the ranges cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), req.dst, req.len) };
        }
        Ok(Done {
            skip: 0,
            len: req.len,
            bytes_read: req.len,
        })
    }
}

impl ReadEngine for MmapEngine {
    fn kind(&self) -> IoKind {
        IoKind::Mmap
    }

    fn describe(&self) -> String {
        "mmap (page cache, copied into destinations on the submitting thread)".into()
    }

    fn direct(&self) -> bool {
        false
    }

    fn align(&self) -> usize {
        1
    }

    fn open(&mut self, path: &Path) -> Result<FileId> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let len = meta.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is only read, by copies. Model files are not modified while sluice runs; if one were truncated underneath us a copy could fault (SIGBUS), the inherent risk of reading by mmap, which is why this engine is the baseline and not the default.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
        };
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map,
            len,
        });
        Ok(self.files.len() - 1)
    }

    fn register_buffers(&mut self, bufs: Vec<AlignedBuf>) -> Result<bool> {
        self.bufs = bufs;
        Ok(false)
    }

    unsafe fn submit(&mut self, reqs: &[ReadReq]) -> Result<()> {
        for req in reqs {
            if req.file >= self.files.len() {
                return Err(Error::NoSuchFile {
                    id: req.file,
                    open: self.files.len(),
                });
            }
            if req.cap < req.len || (req.len > 0 && req.dst.is_null()) {
                return Err(Error::Invalid(format!(
                    "{}: read of {} bytes at offset {} (tag {}): the destination holds {} bytes",
                    self.files[req.file].path.display(),
                    req.len,
                    req.offset,
                    req.tag,
                    req.cap
                )));
            }
        }
        for req in reqs {
            let submitted = Instant::now();
            let result = self.read_one(req);
            self.ready.push_back(Completion {
                tag: req.tag,
                result,
                submitted,
                completed: Instant::now(),
            });
        }
        Ok(())
    }

    fn wait(&mut self, _min: usize, out: &mut Vec<Completion>) -> Result<()> {
        // Everything submitted is already complete.
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        out.extend(self.ready.drain(..));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    fn path(&self, file: FileId) -> &Path {
        &self.files[file].path
    }
}
