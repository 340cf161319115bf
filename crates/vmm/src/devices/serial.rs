//! The 16550 console at COM1 (`vm-superio`), with output to stdout, a file, or nowhere, and a
//! bounded copy of the last lines for reports and tests.
use std::{
    collections::VecDeque,
    fs::OpenOptions,
    io::{self, Write},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Where guest console output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleSink {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file (created if missing, appended to: a VM rebuilt from saved state continues it).
    File(PathBuf),
    /// Discarded (still kept in the tail buffer).
    Null,
}

/// Lines of console output kept in memory.
const TAIL_LINES: usize = 256;

/// The last lines the guest printed, shared with whoever wants to read them.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<String>>>);

impl ConsoleTail {
    /// A copy of the lines kept.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == TAIL_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }
}

/// The writer behind the UART: splits output into lines, prefixes them, forwards them to the
/// sink and keeps the tail.
pub struct ConsoleWriter {
    out: Option<Box<dyn Write + Send>>,
    prefix: String,
    line: Vec<u8>,
    tail: ConsoleTail,
}

impl ConsoleWriter {
    /// A writer for `sink`; every line is prefixed with `prefix`.
    pub fn new(sink: &ConsoleSink, prefix: &str, tail: ConsoleTail) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match sink {
            ConsoleSink::Stdout => Some(Box::new(io::stdout())),
            ConsoleSink::File(p) => Some(Box::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
            ConsoleSink::Null => None,
        };
        Ok(ConsoleWriter {
            out,
            prefix: prefix.to_string(),
            line: Vec::new(),
            tail,
        })
    }

    fn flush_line(&mut self) -> io::Result<()> {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if let Some(out) = self.out.as_mut() {
            writeln!(out, "{}{}", self.prefix, text)?;
            out.flush()?;
        }
        self.tail.push(text);
        Ok(())
    }
}

/// A guest cannot make the VMM hold an unbounded line.
const MAX_LINE: usize = 4096;

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            match b {
                b'\n' => self.flush_line()?,
                b'\r' => {}
                _ => {
                    self.line.push(b);
                    if self.line.len() >= MAX_LINE {
                        self.flush_line()?;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let _ = self.flush_line();
        }
    }
}

/// Raises the serial interrupt through an eventfd (wired to an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// UART registers, as migrated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// The COM1 device on the port bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART writing into `out`, interrupting through `irq`.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The UART's registers.
    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Rebuilds the UART from saved registers, keeping this device's output and interrupt.
    pub fn restore(&mut self, s: &SerialDeviceState) -> io::Result<()> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let placeholder = Serial::new(
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK)?),
            ConsoleWriter {
                out: None,
                prefix: String::new(),
                line: vec![],
                tail: ConsoleTail::default(),
            },
        );
        let old = std::mem::replace(&mut self.uart, placeholder);
        let trigger = EventFdTrigger(old.interrupt_evt().0.try_clone()?);
        let writer = old.into_writer();
        self.uart = Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, writer)
            .map_err(|e| io::Error::other(format!("restoring the UART: {e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
        for b in data.iter_mut().skip(1) {
            *b = 0xff;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}
