//! Namespace 1: a file of `blocks × block_size` bytes.
use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// The backing store.
pub struct Namespace {
    file: File,
    path: PathBuf,
    block_size: u32,
    blocks: u64,
}

impl Namespace {
    /// Opens (or with `create`, creates and sizes) `path` as a namespace of `size` bytes.
    /// Without `create` an existing file's size is used when `size` is 0.
    pub fn open(path: &Path, size: u64, block_size: u32, create: bool) -> Result<Self> {
        if block_size != 512 && block_size != 4096 {
            return Err(Error::Config(format!(
                "block size {block_size} (512 or 4096 supported)"
            )));
        }
        let err = |source| Error::Backing {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let current = file.metadata().map_err(err)?.len();
        let size = if size == 0 { current } else { size };
        if size < block_size as u64 {
            return Err(Error::Config(format!(
                "namespace size {size} bytes is smaller than one {block_size}-byte block"
            )));
        }
        if current < size {
            if !create {
                return Err(Error::Config(format!(
                    "backing file {} has {current} bytes, {size} asked (use --create)",
                    path.display()
                )));
            }
            file.set_len(size).map_err(err)?;
        }
        Ok(Namespace {
            file,
            path: path.to_path_buf(),
            block_size,
            blocks: size / block_size as u64,
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when `[slba, slba + n)` lies inside the namespace.
    pub fn in_range(&self, slba: u64, n: u64) -> bool {
        slba.checked_add(n).is_some_and(|end| end <= self.blocks)
    }

    /// Reads blocks at `slba` into `buf` (a whole number of blocks).
    pub fn read(&self, slba: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, slba * self.block_size as u64)
    }

    /// Writes `buf` at `slba`.
    pub fn write(&self, slba: u64, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(buf, slba * self.block_size as u64)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}
