//! Helpers shared by the integration tests that start real `ferry` processes.
use std::{
    process::{Child, Output},
    sync::mpsc,
    time::{Duration, Instant},
};

/// A child process killed on drop, so a failing test leaves nothing behind. `.1` collects
/// stderr when a reader thread took it over.
pub struct Proc(pub Option<Child>, pub Option<mpsc::Receiver<String>>);

impl Proc {
    /// Waits up to `limit` for the process to exit (killing it and failing the test after
    /// that) and returns its output.
    pub fn wait_output(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = child.wait_with_output().unwrap();
        if let Some(rx) = self.1.take() {
            out.stderr = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_default()
                .into_bytes();
        }
        out
    }

    /// Kills the process (if still there) and reaps it.
    pub fn kill(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
