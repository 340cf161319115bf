//! A hostile device process: a vfio-user socket that answers the handshake and then sends error
//! replies, stalls, or answers out of turn. The client reports each, stays in step after an
//! error reply, gives up on a stall within its deadline, and the watchdog's probe never waits
//! behind a stuck request.
use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use passthrough::{client::Connection, vfio_user::ClientError, Error};

/// What the stand-in does with REGION_READ number `n` (0-based).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Act {
    /// Answers with `n` repeated in every byte.
    Answer,
    /// An error reply (errno 22).
    Refuse,
    /// Reads the request, never answers.
    Stall,
    /// Answers with the wrong message id.
    WrongId,
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn header(id: u16, cmd: u16, size: usize, flags: u32, errno: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&cmd.to_le_bytes());
    h.extend_from_slice(&(size as u32).to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&errno.to_le_bytes());
    h
}

/// Serves one client: VERSION, DEVICE_GET_INFO (a PCI device without regions), then
/// REGION_READs per `script`. Reports each REGION_READ it received on `seen`.
fn serve(mut s: UnixStream, script: Vec<Act>, seen: mpsc::Sender<usize>) {
    let mut reads = 0;
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let id = u16::from_le_bytes([h[0], h[1]]);
        let cmd = u16::from_le_bytes([h[2], h[3]]);
        let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size - 16];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        let reply = match cmd {
            1 => {
                let json = b"{\"capabilities\":{}}\0";
                let mut r = header(id, 1, 20 + json.len(), 1, 0);
                r.extend_from_slice(&[0, 0, 1, 0]);
                r.extend_from_slice(json);
                r
            }
            4 => {
                let mut r = header(id, 4, 32, 1, 0);
                for v in [16u32, 1 << 1, 0, 0] {
                    r.extend_from_slice(&v.to_le_bytes());
                }
                r
            }
            9 => {
                let n = reads;
                reads += 1;
                let _ = seen.send(n);
                let count = u32::from_le_bytes(body[12..16].try_into().unwrap()) as usize;
                match script.get(n).copied().unwrap_or(Act::Answer) {
                    Act::Answer | Act::WrongId => {
                        let rid = if script.get(n) == Some(&Act::WrongId) {
                            id.wrapping_add(7)
                        } else {
                            id
                        };
                        let mut r = header(rid, 9, 32 + count, 1, 0);
                        r.extend_from_slice(&body);
                        r.extend(std::iter::repeat_n(n as u8, count));
                        r
                    }
                    Act::Refuse => header(id, 9, 16, 1 | 1 << 5, 22),
                    Act::Stall => {
                        // Hold the connection open until the client goes away.
                        let mut sink = [0u8; 64];
                        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                        return;
                    }
                }
            }
            _ => header(id, cmd, 16, 1 | 1 << 5, 95),
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

fn stand_in(
    tag: &str,
    script: Vec<Act>,
    timeout: Duration,
) -> (Dir, Connection, mpsc::Receiver<usize>) {
    let dir = std::env::temp_dir().join(format!("ferry-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            serve(s, script, tx);
        }
    });
    let conn = Connection::connect_with("nvme-hostile", &path, timeout).unwrap();
    (Dir(dir), conn, rx)
}

#[test]
fn error_replies_are_reported_and_the_stream_stays_in_step() {
    let (_d, conn, _seen) = stand_in(
        "refuse",
        vec![
            Act::Answer,
            Act::Refuse,
            Act::Answer,
            Act::Refuse,
            Act::Answer,
        ],
        Duration::from_secs(30),
    );
    let mut b = [0u8; 8];
    conn.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    let e = conn.region_read(0, 0, &mut b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Request {
                source: ClientError::Refused(22),
                ..
            }
        ),
        "{e:?}"
    );
    // The next reply is the next request's, not the rest of the error reply.
    conn.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [2; 8]);
    assert!(conn.region_read(0, 0, &mut b).is_err());
    conn.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [4; 8]);
    assert!(!conn.is_lost(), "an error reply is not a lost device");
    assert_eq!(conn.refused(), 2);
}

#[test]
fn a_reply_out_of_turn_loses_the_device() {
    let (_d, conn, _seen) = stand_in("wrong-id", vec![Act::WrongId], Duration::from_secs(30));
    let mut b = [0u8; 8];
    let e = conn.region_read(0, 0, &mut b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Request {
                source: ClientError::Protocol(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(conn.is_lost());
    // Later requests fail at once, without touching the socket.
    assert!(matches!(
        conn.region_read(0, 0, &mut b),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn a_stalled_device_times_out_and_fails_fast_afterwards() {
    let timeout = Duration::from_millis(300);
    let (_d, conn, _seen) = stand_in("stall", vec![Act::Stall], timeout);
    let mut b = [0u8; 8];
    let t = Instant::now();
    let e = conn.region_read(0, 0, &mut b).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Request {
                source: ClientError::Timeout(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(t.elapsed() >= timeout, "gave up before the deadline");
    assert!(conn.is_lost());
    assert!(conn.lost_reason().unwrap().contains("region read"));
    assert!(!conn.check_alive(0));
}

#[test]
fn the_watchdog_probe_never_waits_behind_a_stuck_request() {
    let (_d, conn, seen) = stand_in("watchdog", vec![Act::Stall], Duration::from_secs(60));
    let conn = Arc::new(conn);
    let done = Arc::new(AtomicBool::new(false));
    let stuck = {
        let (conn, done) = (conn.clone(), done.clone());
        std::thread::spawn(move || {
            let mut b = [0u8; 8];
            let r = conn.region_read(0, 0, &mut b);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    // The device has the request: the stuck thread holds the client.
    assert_eq!(seen.recv_timeout(Duration::from_secs(30)).unwrap(), 0);
    // The probe answers while the request is still stuck (it would block on the lock before).
    assert!(
        conn.check_alive(0),
        "busy for less than the deadline: alive"
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "the probe returned before the stuck request"
    );
    // Ending the connection frees the stuck thread.
    conn.shutdown();
    assert!(stuck.join().unwrap().is_err());
}
