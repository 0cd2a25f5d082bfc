//! The descriptor budget: every flow holds a socket, so a daemon raises its soft
//! `RLIMIT_NOFILE` to the hard limit at start (as Go's runtime does) and sizes its flow limits
//! from the result, instead of failing flows with "Too many open files".

/// Descriptors kept for everything that is not a flow (endpoints, ops, logs, certificates).
pub const RESERVED: u64 = 64;

/// Raises the soft descriptor limit to the hard one; returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// How many flows (one descriptor each) fit in the descriptor budget, at most `wanted`.
pub fn flow_budget(wanted: u32) -> u32 {
    let nofile = raise_nofile();
    let budget = nofile.saturating_sub(RESERVED).min(u64::from(u32::MAX)) as u32;
    wanted.min(budget.max(1))
}
