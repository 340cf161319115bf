//! `hello`: print, enumerate PCI, exit 0.
use crate::{pci, println};
use guest_abi::BootParams;

pub fn run(p: &BootParams) -> u32 {
    println!("Hello from the Ferry guest (ring 3)");
    println!("memory: {} MiB", (p.ram_lo_size + p.ram_hi_size) >> 20);
    let n = pci::enumerate(|f| {
        println!(
            "pci 00:{:02x}.{} {:04x}:{:04x} class {:06x}",
            f.dev, f.func, f.vendor, f.device, f.class
        );
    });
    println!("pci: {} function(s)", n);
    println!("hello: done");
    0
}
