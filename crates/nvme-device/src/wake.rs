//! How the polling thread sleeps when the device is idle, and how it is woken.
//!
//! The doorbells live in shared memory that the client maps (into a guest, or into the shadow
//! engine): a store there raises no event the device could wait on. So the polling thread
//! spins while there is work and for a while after the last command, then sleeps on a
//! futex word in the same shared memory (the last word of the first doorbell page, which holds
//! only the admin doorbells and is never mapped into a guest: it is always mediated).
//!
//! A party that writes doorbells from the host side (the vfio-user server thread for trapped
//! doorbell and register writes, the shadow engine for the rings it forwards) calls [`kick`]
//! after its store: one load of the word on the hot path, a `futex(FUTEX_WAKE)` only when the
//! device really sleeps. A guest writing a mapped doorbell directly cannot kick; for it the
//! sleep is bounded: it starts at [`SLEEP_MIN`] and doubles up to [`SLEEP_MAX`], so the first
//! command after an idle spell waits at most that long, and an idle device wakes at most
//! `1 / SLEEP_MAX` times a second.
//!
//! The protocol is a Dekker-style handshake: the sleeper stores [`SLEEPING`], fences and looks
//! at the doorbells once more before it waits; a kicker stores the doorbell, fences and loads
//! the word. One of the two sees the other's store, so a kick is never lost.
//!
//! The last four words of that page form the whole protocol (the device's own doorbells end
//! far below them, and the device ignores doorbell writes there, so a guest whose admin
//! doorbell writes are forwarded cannot forge them):
//!
//! | offset | word | written by |
//! |---|---|---|
//! | [`MAGIC_OFFSET`] | [`MAGIC`]: this device speaks the protocol | the device, at start |
//! | [`HOST_KICKS_OFFSET`] | nonzero: every I/O doorbell is rung from the host side, which kicks | the shadow engine while it forwards |
//! | [`HOST_WAKE_OFFSET`] | a host-side waiter's futex word (the shadow poller): the device kicks it after each round that completed commands | the waiter / the device |
//! | [`WAKE_OFFSET`] | the device's futex word | the device / kickers |
//!
//! While [`HOST_KICKS_OFFSET`] is set the device spins only [`SPIN_WINDOW_KICKED`] after its
//! last command before it sleeps (a kick comes with the next doorbell), instead of
//! [`SPIN_WINDOW`]: like a real controller, it uses no host CPU between the commands it is
//! given. A client that never looks at the magic (a guest driving mapped doorbells) sees the
//! behaviour of before.
use std::{
    sync::atomic::{fence, AtomicU32, Ordering},
    time::Duration,
};

/// Offset of the wake word inside the doorbell area (the last word of its first page).
pub const WAKE_OFFSET: u64 = 0xffc;
/// Offset of the host-side waiter's futex word (see the module docs).
pub const HOST_WAKE_OFFSET: u64 = 0xff8;
/// Offset of the word saying the host side kicks after every I/O doorbell.
pub const HOST_KICKS_OFFSET: u64 = 0xff4;
/// Offset of [`MAGIC`].
pub const MAGIC_OFFSET: u64 = 0xff0;
/// "FWK1": the device speaks this protocol.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FWK1");
/// First byte of the protocol's words in the first doorbell page (doorbell writes from
/// `PROTOCOL_START` on are not the client's to make).
pub const PROTOCOL_START: u64 = MAGIC_OFFSET;
/// The device is (about to be) waiting on the word.
pub const SLEEPING: u32 = 1;
/// The device polls.
pub const AWAKE: u32 = 0;
/// How long the polling thread keeps spinning after the last command it processed: longer than
/// the gaps of a slow but steady submitter (a shadowed queue at QD 1 forwards every ~250 µs on
/// two shared cores), so that only a real idle spell ends in a sleep.
pub const SPIN_WINDOW: Duration = Duration::from_millis(1);
/// The spin window while the host side kicks after every doorbell ([`HOST_KICKS_OFFSET`]):
/// short, so that on a machine whose cores the guest's vCPU and the shadow engine also need
/// the device hands its core over once its work is done.
pub const SPIN_WINDOW_KICKED: Duration = Duration::from_micros(5);
/// While the host side kicks and the polling thread is pinned to one core ([`Pinned`]), it
/// keeps looking at the doorbells after its spin window until this long after its last
/// command, with a `sched_yield` between looks, and only then sleeps: on the core it shares
/// with the shadow engine's poller the two hand the core to each other (a same-core switch: no
/// futex wake-up, no inter-processor interrupt).
pub const YIELD_WINDOW_KICKED: Duration = Duration::from_micros(100);
/// Commands a pinned polling thread takes from a submission queue per round while the host
/// side kicks; it hands its core over after each productive round (see `poll_loop`), so the
/// poller beside it forwards those completions at once (QD 1: no 5 µs spin first). Measured
/// against 8 (more hand-offs per QD 32 batch): no better at QD 1, worse at QD 32.
pub const PIPELINE_BURST: usize = 32;
/// First sleep after the spin window.
pub const SLEEP_MIN: Duration = Duration::from_micros(50);
/// Longest sleep: how late a direct guest's first doorbell after an idle spell may be seen.
pub const SLEEP_MAX: Duration = Duration::from_millis(1);

/// Whether the calling thread may run on one CPU only, looked up at most once per
/// [`Pinned::RECHECK`] (the affinity can be changed from outside at any time).
///
/// A thread that waits on another one by `sched_yield` instead of a futex sleep hands its core
/// over only to threads of that core's run queue: that is a cheap hand-off when the two are
/// pinned to the same core and nothing else runs there (`ferry bench shadow --pin`), and a
/// disaster when the yielder shares its core with a thread that never sleeps (a spinning vCPU,
/// or a compiler), which then keeps the core for a whole time slice. So the yielding hand-off
/// is used only by pinned threads; unpinned ones sleep on the futex words.
#[derive(Debug)]
pub struct Pinned {
    at: Option<std::time::Instant>,
    pinned: bool,
}

impl Default for Pinned {
    fn default() -> Self {
        Self::new()
    }
}

impl Pinned {
    /// How often the affinity is looked up again.
    pub const RECHECK: Duration = Duration::from_millis(10);

    /// Not looked up yet: the first [`Pinned::get`] does.
    pub const fn new() -> Self {
        Pinned {
            at: None,
            pinned: false,
        }
    }

    /// True when the calling thread's affinity is a single CPU.
    pub fn get(&mut self) -> bool {
        let now = std::time::Instant::now();
        if self
            .at
            .is_none_or(|t| now.duration_since(t) >= Self::RECHECK)
        {
            self.at = Some(now);
            self.pinned = one_cpu();
        }
        self.pinned
    }
}

fn one_cpu() -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is a live, writable cpu_set_t of the size given; pid 0 is this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    // SAFETY: CPU_COUNT reads the set filled in above.
    r == 0 && unsafe { libc::CPU_COUNT(&set) } == 1
}

/// Wakes the device whose doorbell area starts at `doorbells` (host address of BAR0 offset
/// `DOORBELL_AREA`, mapped shared) if it sleeps. Call it after the doorbell store.
///
/// # Safety
/// `doorbells` must point to a live mapping of at least the first doorbell page.
pub unsafe fn kick(doorbells: *mut u8) {
    // SAFETY: the caller guarantees the page is mapped; the word is aligned.
    let word = unsafe { AtomicU32::from_ptr(doorbells.add(WAKE_OFFSET as usize).cast()) };
    kick_word(word);
}

/// The protocol's words of a device whose first doorbell page is mapped at `doorbells`, if the
/// device speaks the protocol (its [`MAGIC`] is there).
///
/// # Safety
/// `doorbells` must point to a mapping of at least the first doorbell page that outlives the
/// returned value.
pub unsafe fn words<'a>(doorbells: *mut u8) -> Option<Words<'a>> {
    // SAFETY: the caller guarantees the page is mapped for 'a; the word is aligned.
    let magic = unsafe { AtomicU32::from_ptr(doorbells.add(MAGIC_OFFSET as usize).cast()) };
    // SAFETY: as above.
    (magic.load(Ordering::Acquire) == MAGIC).then(|| unsafe { words_unchecked(doorbells) })
}

/// The protocol's words at `doorbells`, whether or not the device speaks it (call [`words`]
/// once to know).
///
/// # Safety
/// As for [`words`].
pub unsafe fn words_unchecked<'a>(doorbells: *mut u8) -> Words<'a> {
    // SAFETY: the caller guarantees the page is mapped for 'a; the words are aligned.
    let w = |off: u64| unsafe { AtomicU32::from_ptr(doorbells.add(off as usize).cast()) };
    Words {
        device: w(WAKE_OFFSET),
        host: w(HOST_WAKE_OFFSET),
        host_kicks: w(HOST_KICKS_OFFSET),
    }
}

/// The words a host-side client uses (see the module docs).
#[derive(Clone, Copy)]
pub struct Words<'a> {
    /// The device's futex word: [`kick_word`] it after a doorbell store.
    pub device: &'a AtomicU32,
    /// The host-side waiter's futex word: [`prepare`] and [`wait`] on it; the device kicks it.
    pub host: &'a AtomicU32,
    /// Nonzero while the client kicks after every I/O doorbell.
    pub host_kicks: &'a AtomicU32,
}

/// [`kick`] on the word itself.
pub fn kick_word(word: &AtomicU32) {
    // Orders the caller's doorbell store before the load of the word (see the module docs).
    fence(Ordering::SeqCst);
    if word.load(Ordering::Relaxed) == SLEEPING && word.swap(AWAKE, Ordering::SeqCst) == SLEEPING {
        futex_wake(word);
    }
}

/// Announces that the caller is about to sleep; the caller must check for work once more
/// before [`wait`].
pub fn prepare(word: &AtomicU32) {
    word.store(SLEEPING, Ordering::SeqCst);
    fence(Ordering::SeqCst);
}

/// Sleeps until kicked or `timeout` passes (returns at once if a kick came since
/// [`prepare`]); the word is [`AWAKE`] afterwards. Returns true when woken by a kick.
pub fn wait(word: &AtomicU32, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    if word.load(Ordering::SeqCst) == SLEEPING {
        // SAFETY: a FUTEX_WAIT on a live, aligned u32 with a valid relative timeout; shared
        // (not private) because the kicker may be another process mapping the same memfd.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                SLEEPING,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0u32,
            )
        };
    }
    word.swap(AWAKE, Ordering::SeqCst) == AWAKE
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a live, aligned u32; wakes at most one waiter.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1u32,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::Arc, time::Instant};

    #[test]
    fn a_kick_wakes_a_sleeper_and_a_kick_before_the_wait_is_not_lost() {
        let word = Arc::new(AtomicU32::new(AWAKE));
        // Kick between prepare and wait: the wait returns at once, reporting the kick.
        prepare(&word);
        kick_word(&word);
        assert!(wait(&word, Duration::from_secs(60)));
        assert_eq!(word.load(Ordering::SeqCst), AWAKE);
        // A sleeper woken from another thread long before its timeout.
        let (tx, rx) = std::sync::mpsc::channel();
        let w = word.clone();
        let t = std::thread::spawn(move || {
            prepare(&w);
            tx.send(()).unwrap();
            wait(&w, Duration::from_secs(60))
        });
        rx.recv().unwrap();
        let t0 = Instant::now();
        // Until the sleeper is woken (it may not be waiting yet when the first kick comes;
        // every kick it sees ends its wait).
        while !t.is_finished() {
            kick_word(&word);
            assert!(t0.elapsed() < Duration::from_secs(30), "sleeper never woke");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(t.join().unwrap(), "woken by the kick, not the timeout");
        // No sleeper: a kick changes nothing.
        kick_word(&word);
        assert_eq!(word.load(Ordering::SeqCst), AWAKE);
    }

    fn affinity() -> libc::cpu_set_t {
        // SAFETY: a zeroed cpu_set_t is valid; the call fills it for this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            set
        }
    }

    fn set_affinity(set: &libc::cpu_set_t) {
        // SAFETY: a live cpu_set_t of the size given, for this thread.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
        assert_eq!(r, 0);
    }

    #[test]
    fn pinned_is_true_only_for_a_one_cpu_affinity_and_follows_changes() {
        // A thread of its own: the test harness's threads keep their affinity.
        std::thread::spawn(|| {
            let all = affinity();
            // SAFETY: reads the set filled above.
            let n = unsafe { libc::CPU_COUNT(&all) };
            let first = (0..libc::CPU_SETSIZE as usize)
                // SAFETY: `c` is below the set's size.
                .find(|&c| unsafe { libc::CPU_ISSET(c, &all) })
                .unwrap();
            let mut p = Pinned::new();
            assert_eq!(p.get(), n == 1);
            // SAFETY: a zeroed set is valid; CPU_SET writes inside it.
            let one = unsafe {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(first, &mut one);
                one
            };
            set_affinity(&one);
            // The change is seen at the next look after RECHECK.
            let t0 = Instant::now();
            while !p.get() {
                assert!(t0.elapsed() < Duration::from_secs(30), "pinning never seen");
                std::thread::sleep(Pinned::RECHECK);
            }
            if n > 1 {
                set_affinity(&all);
                let t0 = Instant::now();
                while p.get() {
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "unpinning never seen"
                    );
                    std::thread::sleep(Pinned::RECHECK);
                }
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn without_a_kick_the_wait_ends_at_its_timeout() {
        let word = AtomicU32::new(AWAKE);
        prepare(&word);
        assert!(!wait(&word, Duration::from_millis(1)));
        assert_eq!(word.load(Ordering::SeqCst), AWAKE);
    }
}
