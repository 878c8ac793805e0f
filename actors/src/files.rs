//! Reading a whole file no larger than a bound, the one way the node
//! reads what an operator names (configuration, keys, genesis) and what a
//! local archive holds.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why [`read_bounded`] read nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The path is a symbolic link, and links were not to be followed.
    #[error("a symbolic link")]
    SymbolicLink,
    /// A directory, FIFO, socket or device.
    #[error("not a regular file")]
    NotRegular,
    /// Larger than the bound: `size` is what the file held when refused
    /// (the bound plus one if it grew while read).
    #[error("larger than {max} bytes, the most read")]
    TooLarge {
        /// What the file held, or the bound plus one.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// Opening or reading failed (`NotFound` among them).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The bytes of the file at `path`, which must be a regular file of at
/// most `max` bytes. It is opened without blocking, so that a FIFO is
/// refused instead of waiting for a writer, and a device that never ends
/// (`/dev/zero`) or a pipe is refused as not a regular file; no more than
/// `max + 1` bytes are read, should the file grow meanwhile. Symbolic
/// links are followed only if `follow_links`.
pub fn read_bounded(path: &Path, max: u64, follow_links: bool) -> Result<Vec<u8>, ReadError> {
    let flags = if follow_links {
        libc::O_NONBLOCK
    } else {
        libc::O_NONBLOCK | libc::O_NOFOLLOW
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if !follow_links && e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadError::SymbolicLink);
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            max,
        });
    }
    let mut body = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut body)?;
    if body.len() as u64 > max {
        return Err(ReadError::TooLarge {
            size: body.len() as u64,
            max,
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of exactly the bound is read, one byte more is refused; a
    /// link is followed only when asked; a FIFO with no writer is refused
    /// at once rather than waited on; a missing file is `NotFound`.
    #[test]
    fn only_regular_files_within_the_bound_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("object");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_bounded(&file, 10, false).unwrap(), b"0123456789");
        assert!(matches!(
            read_bounded(&file, 9, false),
            Err(ReadError::TooLarge { size: 10, max: 9 })
        ));

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            read_bounded(&link, 10, false),
            Err(ReadError::SymbolicLink)
        ));
        assert_eq!(read_bounded(&link, 10, true).unwrap(), b"0123456789");

        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `name` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        for follow in [false, true] {
            assert!(matches!(
                read_bounded(&fifo, 10, follow),
                Err(ReadError::NotRegular)
            ));
        }
        assert!(matches!(
            read_bounded(dir.path(), 10, true),
            Err(ReadError::NotRegular)
        ));
        match read_bounded(&dir.path().join("missing"), 10, false) {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
    }
}
