//! systemd integration: `sd_notify` readiness, stopping and watchdog messages.
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sends one notification (`READY=1`, `STOPPING=1`, `WATCHDOG=1`, ...).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// The listening socket systemd passed (socket activation, `LISTEN_FDS`), if any.
/// Taken once: the variables are removed so children do not inherit them.
pub fn take_listener() -> Option<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    // Per sd_listen_fds(3) the fds are ours only if LISTEN_PID names us; a launcher
    // that cannot know the pid (tests, some supervisors) leaves it unset.
    if let Ok(pid) = std::env::var("LISTEN_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    // SAFETY: single-threaded start-up, before any other thread reads the environment.
    unsafe {
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if fds == 0 {
        return None;
    }
    // SAFETY: fd 3 (SD_LISTEN_FDS_START) was handed to us to own.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
    listener.set_nonblocking(true).ok()?;
    Some(listener)
}

/// Half the watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Says READY=1 and keeps the watchdog fed until `stop`, then says STOPPING=1.
pub fn ready(stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    notify("READY=1");
    tokio::spawn(async move {
        match watchdog_interval() {
            Some(every) => loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => notify("WATCHDOG=1"),
                    _ = stop.cancelled() => break,
                }
            },
            None => stop.cancelled().await,
        }
        notify("STOPPING=1");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // SAFETY: this test is the only one in the crate that touches this variable.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
}
