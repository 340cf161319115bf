//! A macro for counter blocks: atomics updated on hot paths, a plain `serde` snapshot.

/// Declares `$atomic` (one `AtomicU64` per field, `Default`) and `$snap` (a `serde` struct
/// of `u64`), with `$atomic::snapshot()`.
macro_rules! counters {
    ($(#[$m:meta])* $atomic:ident => $snap:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        #[doc = concat!("Live counters; see [`", stringify!($snap), "`].")]
        #[derive(Debug, Default)]
        pub struct $atomic {
            $(
                #[doc = concat!("See [`", stringify!($snap), "::", stringify!($f), "`].")]
                pub $f: std::sync::atomic::AtomicU64,
            )*
        }
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct $snap {
            $($(#[$fm])* pub $f: u64,)*
        }
        impl $atomic {
            /// A consistent-enough copy of every counter.
            pub fn snapshot(&self) -> $snap {
                $snap { $($f: self.$f.load(std::sync::atomic::Ordering::Relaxed),)* }
            }
        }
    };
}
pub(crate) use counters;

/// Adds one to a counter.
pub(crate) fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}
