//! Crash points for the crash tests: `PLEDGE_CRASH_AT=name[@n][,name[@n]...]` makes the process
//! kill itself with SIGKILL the `n`-th time (default: the first time) it reaches the
//! `fail::fail_point!(name)` of that name. A real kill -9, at an exact place in the code: from
//! that hit on, no thread gets past the point.
//!
//! `PLEDGE_PAUSE_AT=name=ms[,name=ms...]` makes the first pass through the named point stop the
//! thread there for `ms` milliseconds, after printing `pause point <name> reached` to stderr (a
//! test waits for that line, then changes the world, e.g. cuts a link, before the process goes
//! on).
//!
//! `PLEDGE_FAIL_AT=name[,name...]` makes every pass through the named point take the point's
//! error path instead (a fault the real resource cannot be made to produce on demand, e.g. a
//! producer whose commit keeps failing). Only points written with an error path honour it.
//!
//! Binaries call [`install`] only when built with their `failpoints` feature; without it the
//! points compile to nothing and this crate is not linked.

use std::sync::atomic::{AtomicU64, Ordering};

/// Reads `PLEDGE_FAIL_AT`, `PLEDGE_PAUSE_AT` and `PLEDGE_CRASH_AT` and arms the named points.
/// Exits with status 2 on a malformed value.
pub fn install() {
    if let Ok(spec) = std::env::var("PLEDGE_PAUSE_AT") {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let Some((name, ms)) = item.split_once('=').and_then(|(n, ms)| Some((n.to_string(), ms.parse().ok()?)))
            else {
                fail_setup(&format!("PLEDGE_PAUSE_AT: {item:?}: expected name=MILLISECONDS"));
            };
            let once = std::sync::atomic::AtomicBool::new(false);
            let point = name.clone();
            let armed = fail::cfg_callback(&name, move || {
                if !once.swap(true, Ordering::SeqCst) {
                    eprintln!("pause point {point} reached: pausing {ms} ms");
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
            });
            if let Err(e) = armed {
                fail_setup(&format!("PLEDGE_PAUSE_AT: {name}: {e}"));
            }
        }
    }
    if let Ok(spec) = std::env::var("PLEDGE_FAIL_AT") {
        for name in spec.split(',').filter(|s| !s.is_empty()) {
            if let Err(e) = fail::cfg(name, "return") {
                fail_setup(&format!("PLEDGE_FAIL_AT: {name}: {e}"));
            }
        }
    }
    let Ok(spec) = std::env::var("PLEDGE_CRASH_AT") else { return };
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let (name, nth) = match item.split_once('@') {
            Some((name, n)) => match n.parse::<u64>() {
                Ok(n) if n > 0 => (name.to_string(), n),
                _ => fail_setup(&format!("PLEDGE_CRASH_AT: {item:?}: expected name@N with N > 0")),
            },
            None => (item.to_string(), 1),
        };
        let hits = AtomicU64::new(0);
        let point = name.clone();
        let armed = fail::cfg_callback(&name, move || {
            let hit = hits.fetch_add(1, Ordering::SeqCst) + 1;
            if hit < nth {
                return;
            }
            if hit == nth {
                eprintln!("crash point {point} reached (hit {nth}): killing this process with SIGKILL");
            }
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // SIGKILL reaches the other threads a moment later: until then no thread may get
            // past this point (the calling one, or another that reaches it meanwhile, e.g. the
            // commit of a second branch on another core), or the crash would not be where the
            // test says it is.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        if let Err(e) = armed {
            fail_setup(&format!("PLEDGE_CRASH_AT: {name}: {e}"));
        }
    }
}

fn fail_setup(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}
