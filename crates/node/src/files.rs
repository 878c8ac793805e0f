//! Reading the files an operator names: the configuration, the genesis,
//! keys and certificates, other validators' public files.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
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
    let refused = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refused("not a regular file".into()));
    }
    let too_large = || refused(format!("larger than {MAX_FILE_BYTES} bytes, the most read"));
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(text)
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
