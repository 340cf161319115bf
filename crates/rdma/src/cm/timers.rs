//! CM timing as Linux does it.
//!
//! A CM timeout field `t` (5 bits) means 4.096 µs × 2^t (IBA 12.7.x; Linux
//! `cm_convert_to_ms`). The side sending a REQ puts its response timeout in both the REQ's
//! remote and local CM response timeout fields and retries up to `max_retries` times (≤ 15,
//! the 4-bit MaxCMRetries field); the passive side retries its REP with the REQ's local
//! response timeout and retry count. An MRA extends the wait by its service timeout. After a
//! disconnect a connection stays in time-wait for [`super::CmConfig::timewait`].
use std::time::Duration;

/// Linux's default CM response timeout exponent (≈ 4.3 s).
pub const LINUX_RESPONSE_TIMEOUT: u8 = 20;
/// Linux's default (and IBA's largest) number of CM retries.
pub const LINUX_MAX_RETRIES: u8 = 15;
/// The MRA service timeout rdma_cm announces (`CMA_CM_MRA_SETTING`, 24 ≈ 69 s).
pub const LINUX_MRA_SERVICE_TIMEOUT: u8 = 24;

/// The largest timeout exponent taken from a peer's message (REQ response timeout, MRA
/// service timeout): 24, ≈ 69 s, what rdma_cm announces in its MRAs. A field of 31 would
/// mean 2.4 hours per retry: a spoofed REQ must not hold a connection that long.
pub const MAX_PEER_TIMEOUT: u8 = LINUX_MRA_SERVICE_TIMEOUT;

/// [`cm_timeout`] of an exponent a peer sent, clamped to [`MAX_PEER_TIMEOUT`]; the flag says
/// whether it was clamped.
pub fn peer_timeout(exp: u8) -> (Duration, bool) {
    (
        cm_timeout(exp.min(MAX_PEER_TIMEOUT)),
        exp > MAX_PEER_TIMEOUT,
    )
}

/// 4.096 µs × 2^`exp` (`exp` is a 5-bit field; larger values are clamped to 31).
pub fn cm_timeout(exp: u8) -> Duration {
    Duration::from_nanos(4096u64 << u32::from(exp.min(31)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_default_is_about_four_seconds() {
        let t = cm_timeout(LINUX_RESPONSE_TIMEOUT);
        assert!(
            t > Duration::from_millis(4290) && t < Duration::from_millis(4300),
            "{t:?}"
        );
        assert_eq!(cm_timeout(0), Duration::from_nanos(4096));
        assert_eq!(cm_timeout(40), cm_timeout(31));
    }

    #[test]
    fn a_peers_timeout_is_clamped_to_about_a_minute() {
        assert_eq!(peer_timeout(20), (cm_timeout(20), false));
        assert_eq!(peer_timeout(24), (cm_timeout(24), false));
        let (t, clamped) = peer_timeout(31);
        assert!(clamped);
        assert!(t < Duration::from_secs(70), "{t:?}");
    }
}
