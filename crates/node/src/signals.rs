//! Signal handling shared by `run` and `localnet`.

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use tokio::signal::unix::Signal as Stream;

/// Whether SIGHUP was ignored when the process started (`nohup`): a
/// handler installed over it would stop at logout a node started so to
/// outlive it. The disposition is read by setting it to "ignore" and
/// putting back what was there if that was not it.
pub fn hangup_ignored() -> bool {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: no handler is installed: the disposition becomes "ignore"
    // for a moment, then is put back as it was, before any other thread
    // of this program handles SIGHUP.
    let Ok(old) = (unsafe { sigaction(Signal::SIGHUP, &ignore) }) else {
        return false;
    };
    if old.handler() == SigHandler::SigIgn {
        return true;
    }
    // SAFETY: puts back the disposition just read.
    let _ = unsafe { sigaction(Signal::SIGHUP, &old) };
    false
}

/// The next signal on `stream`, or never if there is none.
pub async fn recv(stream: &mut Option<Stream>) {
    match stream {
        Some(stream) => {
            stream.recv().await;
        }
        None => std::future::pending().await,
    }
}
