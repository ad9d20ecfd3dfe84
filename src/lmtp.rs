//! LMTP intake (RFC 2033): how another MTA or a filter on this machine
//! hands mail to letterbox for final delivery. The session is the SMTP
//! session in [`Protocol::Lmtp`]: LHLO instead of EHLO, recipients checked
//! at RCPT exactly as over SMTP, and one reply per recipient after the
//! data, so a full mailbox fails only its own recipient.
//!
//! LMTP has no authentication and is for trusted local clients: it is off
//! by default (`lmtp.listen = []`) and `letterbox check` warns about a TCP
//! address that is not loopback. A unix socket is removed and re-created
//! at start, with mode 0660 so the MTA's group can be given access.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context as _;
use tokio::net::{TcpListener, UnixListener};

use crate::config::ListenAddr;
use crate::smtp::server::Socket;

/// Mode of an LMTP unix socket: the server's user and group.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds one LMTP address.
pub async fn bind(addr: &ListenAddr) -> anyhow::Result<Socket> {
    match addr {
        ListenAddr::Tcp(a) => {
            let l = TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for LMTP on {a}"))?;
            Ok(Socket::Tcp(l))
        }
        ListenAddr::Unix(path) => {
            let p = path.clone();
            crate::blocking::run("binding the LMTP socket", move || bind_unix(&p))
                .await?
                .with_context(|| format!("cannot listen for LMTP on unix:{}", path.display()))
        }
    }
}

/// Replaces a stale socket (a previous run's) and binds anew. Anything
/// else at the path is left alone: that is the operator's file.
fn bind_unix(path: &Path) -> anyhow::Result<Socket> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // tokio's bind needs a runtime context; this thread has one.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    Ok(Socket::Unix(listener, path.to_path_buf()))
}
