//! Readiness for service managers: systemd's `sd_notify` protocol (`Type=notify`). When the
//! manager set `NOTIFY_SOCKET`, the router sends `READY=1` once it serves (after its start
//! line), `RELOADING=1` and `READY=1` around a reload, and `STOPPING=1` when it begins to
//! shut down. The protocol is one datagram of `KEY=VALUE` lines to a Unix socket; written
//! here in a few lines rather than with a crate, since it has nothing more to it.

/// Sends `state` (e.g. `READY=1`) to the service manager, if one asked (`NOTIFY_SOCKET`).
/// Failures are logged and otherwise ignored: the router serves either way.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = send(&socket, state) {
        tracing::warn!(%error, "telling the service manager {state:?} failed");
    }
}

#[cfg(unix)]
fn send(socket: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let bytes = socket.as_bytes();
    let sender = UnixDatagram::unbound()?;
    match bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): the name without its leading '@'.
        Some(name) => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sender.send_to_addr(state.as_bytes(), &addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(std::io::Error::other("abstract sockets are Linux only"));
            }
        }
        None => {
            sender.send_to(state.as_bytes(), std::path::Path::new(socket))?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn send(_socket: &std::ffi::OsStr, _state: &str) -> std::io::Result<()> {
    Err(std::io::Error::other("NOTIFY_SOCKET needs Unix sockets"))
}
