//! Key files: the network key (the node's identity), the protocol key (signs
//! blocks), the TLS key and identity-bound certificate, and `public.toml`,
//! the public half of the first two, for a genesis.

use std::io::Write;
use std::path::Path;

use soma_types::{KeyPair, PeerId, PublicKey};
use soma_wire::tls::NodeIdentity;

use crate::genesis::{PUBLIC_FILE, PublicFile};

/// Network key file name.
pub const NETWORK_KEY: &str = "network.key";
/// Protocol key file name.
pub const PROTOCOL_KEY: &str = "protocol.key";
/// TLS certificate file name.
pub const TLS_CERT: &str = "tls.crt";
/// TLS private key file name.
pub const TLS_KEY: &str = "tls.key";

/// A key file problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Keys exist and `--force` was not given.
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key file holds no valid key.
    #[error("{0}: not a key written by `soma-p2p keygen` (64 hex characters)")]
    Invalid(String),
    /// The TLS certificate is not bound to the network key.
    #[error("{0}")]
    Tls(String),
}

/// The keys of a node.
pub struct NodeKeys {
    /// The network key.
    pub network: KeyPair,
    /// The public half of the protocol key (this binary signs nothing
    /// with it: a local network's producer plays every validator).
    pub protocol: PublicKey,
    /// The TLS identity, bound to the network key.
    pub identity: NodeIdentity,
}

impl NodeKeys {
    /// The node's peer id.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from(self.network.public())
    }
}

/// Writes a secret file, readable by its owner only (mode 0600), whole or
/// not at all: written beside it, synced, then renamed over it, so a crash
/// leaves the old file or the new one, and a file there before, whatever
/// its mode, is replaced by one of mode 0600.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    write_whole(path, contents, false)
}

/// Writes `contents` to `path` whole or not at all, as [`write_secret`]
/// does, readable by all (mode 0644) if `public`: a file cut short by a
/// crash or a full disk is never left where one is read.
pub fn write_whole(path: &Path, contents: &[u8], public: bool) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Created with mode 0600.
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    if public {
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::Permissions::from_mode(0o644);
        file.as_file().set_permissions(readable).map_err(io)?;
    }
    file.as_file().sync_all().map_err(io)?;
    file.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Writes keys into `dir`: `network` and `protocol` (fresh if `None`), and a
/// TLS identity bound to the network key. Refuses to overwrite existing keys
/// unless `force`.
pub fn write_keys(
    dir: &Path,
    network: Option<KeyPair>,
    protocol: Option<KeyPair>,
    force: bool,
) -> Result<NodeKeys, KeyError> {
    let io = |source| KeyError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    if !force {
        for name in [NETWORK_KEY, PROTOCOL_KEY, TLS_CERT, TLS_KEY, PUBLIC_FILE] {
            let path = dir.join(name);
            if path.exists() {
                return Err(KeyError::Exists(path.display().to_string()));
            }
        }
    }
    let network = network.unwrap_or_else(KeyPair::generate);
    let protocol = protocol.unwrap_or_else(KeyPair::generate);
    let identity = NodeIdentity::generate(&network).map_err(|e| KeyError::Tls(e.to_string()))?;
    write_secret(
        &dir.join(NETWORK_KEY),
        hex::encode(network.secret_bytes()).as_bytes(),
    )?;
    write_secret(
        &dir.join(PROTOCOL_KEY),
        hex::encode(protocol.secret_bytes()).as_bytes(),
    )?;
    write_secret(&dir.join(TLS_KEY), identity.key_pem().as_bytes())?;
    write_public(&dir.join(TLS_CERT), identity.cert_pem())?;
    let public = PublicFile::new(&network.public(), &protocol.public());
    write_public(
        &dir.join(PUBLIC_FILE),
        toml::to_string(&public).expect("a public file encodes"),
    )?;
    Ok(NodeKeys {
        network,
        protocol: protocol.public(),
        identity,
    })
}

fn write_public(path: &Path, contents: String) -> Result<(), KeyError> {
    write_whole(path, contents.as_bytes(), true)
}

fn read_key(path: &Path) -> Result<KeyPair, KeyError> {
    let text = crate::files::read_text(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    warn_if_readable_by_others(path);
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|_| KeyError::Invalid(path.display().to_string()))?;
    Ok(KeyPair::from_seed(seed))
}

/// Logs a warning if the secret at `path` can be read by its group or by
/// anyone: a key copied or written by hand may have kept a wider mode.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "secret key readable by others: chmod 600 it"
            );
        }
    }
}

/// Writes a new TLS pair in `dir` for the network key there, over a pair
/// missing, damaged or bound to another key: the node keeps its identity
/// (`keygen --force` would make new network and protocol keys too).
/// Returns the node's peer id.
pub fn write_tls(dir: &Path) -> Result<PeerId, KeyError> {
    let network = read_key(&dir.join(NETWORK_KEY)).map_err(|e| {
        KeyError::Tls(format!(
            "{e}; --tls-only makes a pair for the network key already in --out"
        ))
    })?;
    let identity = NodeIdentity::generate(&network).map_err(|e| KeyError::Tls(e.to_string()))?;
    write_secret(&dir.join(TLS_KEY), identity.key_pem().as_bytes())?;
    write_public(&dir.join(TLS_CERT), identity.cert_pem())?;
    Ok(identity.peer_id())
}

/// The fix for a TLS pair in `dir` that cannot be used.
fn tls_fix(dir: &Path) -> String {
    format!(
        "run `soma-p2p keygen --tls-only --out {}` for a new pair bound to this node's \
         network key (not `--force`: that makes new network and protocol keys, another identity)",
        dir.display()
    )
}

/// Reads the keys in `dir`, checking the TLS certificate is bound to the
/// network key.
pub fn read_keys(dir: &Path) -> Result<NodeKeys, KeyError> {
    let network = read_key(&dir.join(NETWORK_KEY))?;
    // This binary signs no block with it (a local network's producer plays
    // every validator from its own seed): its public half is checked
    // against the genesis only.
    let protocol = read_key(&dir.join(PROTOCOL_KEY))?.public();
    let read = |name: &str| {
        crate::files::read_text(&dir.join(name)).map_err(|source| KeyError::Io {
            path: dir.join(name).display().to_string(),
            source,
        })
    };
    warn_if_readable_by_others(&dir.join(TLS_KEY));
    let unusable = |what: String| KeyError::Tls(format!("{what}; {}", tls_fix(dir)));
    let (cert, key) = match (read(TLS_CERT), read(TLS_KEY)) {
        (Ok(cert), Ok(key)) => (cert, key),
        // Missing: a new pair is the fix. Unreadable (the wrong user, a
        // directory): the pair may be fine, and is not to be replaced.
        (Err(e @ KeyError::Io { .. }), _) | (_, Err(e @ KeyError::Io { .. })) if matches!(&e, KeyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound) =>
        {
            return Err(unusable(e.to_string()));
        }
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    let identity = NodeIdentity::from_pem(&cert, &key).map_err(|e| {
        unusable(format!(
            "{} and {}: {e}",
            dir.join(TLS_CERT).display(),
            dir.join(TLS_KEY).display()
        ))
    })?;
    if identity.peer_id() != PeerId::from(network.public()) {
        return Err(unusable(format!(
            "{} is bound to another network key",
            dir.join(TLS_CERT).display()
        )));
    }
    Ok(NodeKeys {
        network,
        protocol,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A secret written over a file anyone could read (a key copied in by
    /// hand, say) leaves a file its owner alone can read, whole, and
    /// nothing else beside it.
    #[test]
    fn a_secret_written_over_a_world_readable_file_is_left_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NETWORK_KEY);
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(format!("{mode:o}"), "600");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A TLS pair bound to another key, or missing, is refused with the
    /// fix that keeps the node's identity, and that fix (`write_tls`)
    /// makes a pair the node reads, its network key and peer id unchanged.
    #[test]
    fn an_unusable_tls_pair_is_replaced_keeping_the_identity() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let peer = write_keys(ours.path(), None, None, false)
            .unwrap()
            .peer_id();
        write_keys(theirs.path(), None, None, false).unwrap();
        let network = std::fs::read(ours.path().join(NETWORK_KEY)).unwrap();
        for name in [TLS_CERT, TLS_KEY] {
            std::fs::copy(theirs.path().join(name), ours.path().join(name)).unwrap();
        }
        let refused = read_keys(ours.path())
            .err()
            .expect("another key's pair")
            .to_string();
        assert!(
            refused.contains("bound to another network key"),
            "{refused}"
        );
        assert!(refused.contains("keygen --tls-only"), "{refused}");
        std::fs::remove_file(ours.path().join(TLS_CERT)).unwrap();
        let refused = read_keys(ours.path())
            .err()
            .expect("no certificate")
            .to_string();
        assert!(refused.contains("keygen --tls-only"), "{refused}");

        assert_eq!(write_tls(ours.path()).unwrap(), peer);
        assert_eq!(read_keys(ours.path()).unwrap().peer_id(), peer);
        assert_eq!(
            std::fs::read(ours.path().join(NETWORK_KEY)).unwrap(),
            network
        );
    }
}
