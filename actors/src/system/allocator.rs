//! The C allocator's arenas, for a program that runs a node.
//!
//! glibc's `malloc` gives a thread that finds an arena locked an arena of
//! its own, up to eight per core, and keeps each arena's freed memory for
//! that arena. A node's many threads (the runtime's, the actors', the
//! Verifier's pool, the blocking pool) then hold memory freed in one arena
//! that the next allocation, in another, cannot use, and its peak depends
//! on which threads happened to allocate where: in the memory benchmark,
//! peaks of one run of 39 to 57 MiB for the same catch-up, and a long
//! chain's peak 16 to 34 % above a short one's. One arena per core keeps
//! both flat (docs/benchmarks.md, "Memory: the allocator's arenas").

/// The environment variable through which glibc takes the arena limit; when
/// the operator sets it, it is left to glibc.
pub const ARENA_ENV: &str = "MALLOC_ARENA_MAX";

/// The arena limit to set: one per core, unless the operator chose one.
fn arenas_to_set(operator: Option<&str>, cores: usize) -> Option<usize> {
    operator.is_none().then_some(cores.max(1))
}

/// Limits glibc's `malloc` to one arena per core, unless `MALLOC_ARENA_MAX`
/// is set (glibc then reads it itself). Call it first thing in `main`,
/// before any thread is started. Returns the limit it set; `None` when it
/// set none (the variable was set, or the C library is not glibc).
pub fn limit_allocator_arenas() -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = arenas_to_set(std::env::var(ARENA_ENV).ok().as_deref(), cores)?;
    set_arena_max(arenas).then_some(arenas)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(arenas: usize) -> bool {
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only changes a setting of the C allocator; it takes
    // no pointer and may be called at any time.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_arena_per_core_unless_the_operator_chose() {
        assert_eq!(arenas_to_set(None, 2), Some(2));
        assert_eq!(arenas_to_set(None, 32), Some(32));
        assert_eq!(arenas_to_set(None, 0), Some(1));
        assert_eq!(arenas_to_set(Some("4"), 2), None);
        assert_eq!(arenas_to_set(Some(""), 2), None);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_limit() {
        if std::env::var_os(ARENA_ENV).is_some() {
            // The operator's choice stands: nothing is set.
            assert_eq!(limit_allocator_arenas(), None);
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(limit_allocator_arenas(), Some(cores));
        }
    }
}
