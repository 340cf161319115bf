//! CPU time of threads, for the reports' CPU seconds per GiB.
use std::time::Duration;

/// CPU time the calling thread has used so far (user + system).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Measures the CPU time of the calling thread from its creation on.
#[derive(Clone, Copy, Debug)]
pub struct ThreadCpu(Duration);

impl ThreadCpu {
    /// Starts measuring now.
    pub fn start() -> Self {
        ThreadCpu(thread_cpu_time())
    }

    /// CPU time of this thread since `start` (call it on the same thread).
    pub fn elapsed(&self) -> Duration {
        thread_cpu_time().saturating_sub(self.0)
    }
}

/// A side's CPU seconds for its report: its main thread's since `main` started plus the data
/// channels' `channels_cpu_s`, the two logged apart (debug).
pub(crate) fn side_total(main: &ThreadCpu, channels_cpu_s: f64) -> f64 {
    let main_cpu_s = main.elapsed().as_secs_f64();
    tracing::debug!(main_cpu_s, channels_cpu_s, "CPU of the migration's threads");
    main_cpu_s + channels_cpu_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_uses_cpu_time() {
        let c = ThreadCpu::start();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(c.elapsed() > Duration::ZERO);
    }
}
