//! Reading the files an operator names: the configuration, the genesis,
//! keys and certificates, other validators' public files.

use std::path::Path;

/// The largest file the node reads: a genesis of the largest committee
/// (1,024 validators) takes about 300 KiB.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// The text of the file at `path`, which must be a regular file of at
/// most [`MAX_FILE_BYTES`]. It is opened without blocking, so a FIFO
/// named by mistake is refused instead of waiting for a writer, and a
/// device that never ends (`/dev/zero`) is refused as not a regular file,
/// as a pipe is (`<(envsubst < node.toml)`, a piped `/dev/stdin`).
/// Symbolic links are followed (configurations are often mounted as
/// links).
pub fn read_text(path: &Path) -> std::io::Result<String> {
    use soma_actors::files::{ReadError, read_bounded};
    let bytes = read_bounded(path, MAX_FILE_BYTES, true).map_err(|e| match e {
        ReadError::Io(e) => e,
        refused => std::io::Error::new(std::io::ErrorKind::InvalidInput, refused.to_string()),
    })?;
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A regular file is read whole; a FIFO (with no writer: opened for
    /// reading as before, it blocked until one came), a directory and a
    /// file past the bound are refused, each saying why.
    #[test]
    fn only_regular_files_within_the_bound_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "listen-address = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(
            read_text(&file).unwrap(),
            "listen-address = \"127.0.0.1:0\"\n"
        );

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let refused = |path: &Path| read_text(path).unwrap_err().to_string();
        assert_eq!(refused(&fifo), "not a regular file");
        assert_eq!(refused(dir.path()), "not a regular file");

        let large = dir.path().join("large.toml");
        std::fs::write(&large, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert_eq!(refused(&large), "larger than 4194304 bytes, the most read");
        std::fs::write(&large, vec![b'#'; MAX_FILE_BYTES as usize]).unwrap();
        assert_eq!(read_text(&large).unwrap().len() as u64, MAX_FILE_BYTES);
    }
}
