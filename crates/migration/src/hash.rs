//! A debug hash of all guest RAM, so two processes can show their memory is byte-identical
//! without trusting the code that copied it.
use vmm::memory::GuestRam;
use xxhash_rust::xxh3::Xxh3;

/// XXH3-64 over every RAM region in address order, as 16 hex digits.
///
/// Callers pause the vCPUs (and devices) first when they need a stable answer.
pub fn memory_hash(ram: &GuestRam) -> String {
    let mut h = Xxh3::new();
    ram.for_each_region(1 << 20, |r, offset, bytes| {
        if offset == 0 {
            h.update(&r.gpa.to_le_bytes());
        }
        h.update(bytes);
    });
    format!("{:016x}", h.digest())
}
