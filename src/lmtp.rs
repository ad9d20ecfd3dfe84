//! LMTP intake (RFC 2033): how another MTA or a filter on this machine
//! hands mail to letterbox for final delivery. The session is the SMTP
//! session in [`Protocol::Lmtp`]: LHLO instead of EHLO, recipients checked
//! at RCPT exactly as over SMTP, and one reply per recipient after the
//! data, so a full mailbox fails only its own recipient.
//!
//! LMTP has no authentication and is for trusted local clients: it is off
//! by default (`lmtp.listen = []`) and `letterbox check` warns about a TCP
//! address that is not loopback. A unix socket is removed and re-created
//! at start, with mode 0660 and the group `lmtp.socket_group` (the other
//! MTA's group, e.g. `postfix`) so the MTA can be given access.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context as _;
use tokio::net::{TcpListener, UnixListener};

use crate::config::ListenAddr;
use crate::smtp::server::Socket;

/// Mode of an LMTP unix socket: the server's user and group.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds one LMTP address; a unix socket gets `group` (a group name) when
/// given.
pub async fn bind(addr: &ListenAddr, group: Option<&str>) -> anyhow::Result<Socket> {
    match addr {
        ListenAddr::Tcp(a) => {
            let l = TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for LMTP on {a}"))?;
            Ok(Socket::Tcp(l))
        }
        ListenAddr::Unix(path) => {
            let (p, g) = (path.clone(), group.map(str::to_string));
            crate::blocking::run("binding the LMTP socket", move || {
                bind_unix(&p, g.as_deref())
            })
            .await?
            .with_context(|| format!("cannot listen for LMTP on unix:{}", path.display()))
        }
    }
}

/// Replaces a stale socket (a previous run's) and binds anew. Anything
/// else at the path is left alone: that is the operator's file.
fn bind_unix(path: &Path, group: Option<&str>) -> anyhow::Result<Socket> {
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
    if let Some(name) = group {
        let gid = group_id(name)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give the socket to group {name}"))?;
    }
    Ok(Socket::Unix(listener, path.to_path_buf()))
}

/// The id of group `name`, from the system's group database.
fn group_id(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name).context("a group name holds no NUL")?;
    // SAFETY: getgrnam reads the C string and returns a pointer into static
    // storage, or null; we copy the id out at once. Binding runs before
    // any session, so no other thread calls getgrnam meanwhile.
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    if entry.is_null() {
        anyhow::bail!("lmtp.socket_group: no group named {name:?}");
    }
    // SAFETY: non-null, so it points at a valid group entry.
    Ok(unsafe { (*entry).gr_gid })
}
