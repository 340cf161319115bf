//! Console output on the 16550 at COM1.
use guest_abi::ports::SERIAL_COM1;

/// Writes to the serial transmit register. Each byte is one VM exit, so the guest prints only
/// short, infrequent lines.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                crate::io::outb(SERIAL_COM1, b'\r');
            }
            crate::io::outb(SERIAL_COM1, b);
        }
        Ok(())
    }
}

/// Prints a line on the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::Console, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut $crate::console::Console, "\n");
    }};
}
