//! Loads the guest ELF into guest RAM. The image is untrusted input (`--guest PATH`): every
//! segment must lie inside the image area and inside the file.
use goblin::elf::{header, program_header::PT_LOAD, Elf};
use guest_abi::layout::{IMAGE_BASE, WORK_BASE};

use crate::{memory::GuestRam, Error, Result};

/// Where the image was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point.
    pub entry: u64,
    /// First byte after the highest segment.
    pub end: u64,
}

/// Copies the PT_LOAD segments of `image` into `ram` and returns the entry point.
pub fn load_elf(ram: &GuestRam, image: &[u8]) -> Result<LoadedImage> {
    let bad = |m: String| Error::GuestImage(m);
    let elf = Elf::parse(image).map_err(|e| bad(format!("not an ELF file: {e}")))?;
    if !elf.is_64 || elf.header.e_machine != header::EM_X86_64 {
        return Err(bad(format!(
            "not an x86-64 ELF64 image (machine {})",
            elf.header.e_machine
        )));
    }
    if elf.header.e_type != header::ET_EXEC {
        return Err(bad(format!(
            "not a static executable (ELF type {})",
            elf.header.e_type
        )));
    }
    let mut end = 0;
    let mut entry_ok = false;
    let mut loaded = 0;
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let (addr, memsz, filesz, off) = (ph.p_paddr, ph.p_memsz, ph.p_filesz, ph.p_offset);
        let seg_end = addr
            .checked_add(memsz)
            .ok_or_else(|| bad(format!("segment at {addr:#x} wraps")))?;
        if addr < IMAGE_BASE || seg_end > WORK_BASE {
            return Err(bad(format!(
                "segment {addr:#x}..{seg_end:#x} is outside the image area {IMAGE_BASE:#x}..{WORK_BASE:#x}"
            )));
        }
        if filesz > memsz {
            return Err(bad(format!(
                "segment at {addr:#x} has file size {filesz} > memory size {memsz}"
            )));
        }
        let file_end = off
            .checked_add(filesz)
            .filter(|&e| e <= image.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "segment at {addr:#x} reads bytes {off}..{} past the end of the file",
                    off.saturating_add(filesz)
                ))
            })?;
        ram.write(addr, &image[off as usize..file_end as usize])?;
        ram.write(addr + filesz, &vec![0u8; (memsz - filesz) as usize])?;
        if ph.is_executable() && (addr..seg_end).contains(&elf.entry) {
            entry_ok = true;
        }
        end = end.max(seg_end);
        loaded += 1;
    }
    if loaded == 0 {
        return Err(bad("no loadable segments".into()));
    }
    if !entry_ok {
        return Err(bad(format!(
            "entry point {:#x} is not in an executable segment",
            elf.entry
        )));
    }
    Ok(LoadedImage {
        entry: elf.entry,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_built_in_guest() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let img = load_elf(&ram, guest_image::GUEST_ELF).unwrap();
        assert_eq!(img.entry, IMAGE_BASE);
        let mut first = [0u8; 4];
        ram.read(IMAGE_BASE, &mut first).unwrap();
        assert_ne!(first, [0; 4]);
    }

    #[test]
    fn rejects_garbage_and_truncated_images() {
        let ram = GuestRam::new(32 << 20).unwrap();
        assert!(load_elf(&ram, b"not an elf").is_err());
        assert!(load_elf(&ram, &[]).is_err());
        let elf = guest_image::GUEST_ELF;
        for cut in [64, 200, elf.len() / 2] {
            assert!(load_elf(&ram, &elf[..cut]).is_err(), "truncated at {cut}");
        }
    }
}
