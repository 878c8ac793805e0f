//! What keeps an inbound connection from its idle timeout: requests and
//! answers, not bytes on the socket.
//!
//! Counted as bytes, a connection that asked nothing stayed active for as
//! long as it lived: the server's own HTTP/2 pings (every
//! `http2-keepalive-interval`) and the client's acknowledgements were
//! traffic, so a passive connection, or one whose streams were stalled,
//! was kept until `max-connection-age` rather than the idle timeout, and
//! the idlest connection evicted for a newcomer was not the one that had
//! asked least. [`Watched`] sits between TLS and HTTP/2 and reads the
//! header of every frame each way ([`FrameScanner`]): only HEADERS and
//! DATA frames (a request, an answer, their bodies) touch the
//! connection's activity; PING, SETTINGS, WINDOW_UPDATE and the rest do
//! not.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::inbound::Toucher;

/// The client's connection preface, before its first frame (RFC 9113,
/// section 3.4).
const CLIENT_PREFACE_BYTES: usize = 24;

/// A frame header: a 24-bit length, a type, flags and a stream id.
const FRAME_HEADER_BYTES: usize = 9;

/// The frame types that carry requests and answers.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;

/// Follows one direction of an HTTP/2 connection through its frame
/// headers, skipping payloads, across reads of any size.
#[derive(Debug)]
pub struct FrameScanner {
    /// Preface bytes still to skip.
    preface: usize,
    header: [u8; FRAME_HEADER_BYTES],
    /// Bytes of `header` read so far.
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload: usize,
    /// Whether a whole frame header was read (so the preface too).
    framed: bool,
    /// Whether the current frame is a DATA frame.
    in_data: bool,
    /// DATA payload bytes read so far.
    data: u64,
}

impl FrameScanner {
    /// The direction from the client: a preface, then frames.
    pub fn from_client() -> Self {
        Self::with_preface(CLIENT_PREFACE_BYTES)
    }

    /// The direction from the server: frames from the first byte.
    pub fn from_server() -> Self {
        Self::with_preface(0)
    }

    fn with_preface(preface: usize) -> Self {
        FrameScanner {
            preface,
            header: [0; FRAME_HEADER_BYTES],
            header_len: 0,
            payload: 0,
            framed: false,
            in_data: false,
            data: 0,
        }
    }

    /// Whether a whole frame header was read: from the client, its
    /// preface is past, and its HTTP/2 connection is set up.
    pub fn framed(&self) -> bool {
        self.framed
    }

    /// DATA payload bytes read so far: answers' bytes, from the server.
    pub fn data(&self) -> u64 {
        self.data
    }

    /// Reads `bytes`, the next of its direction; whether a HEADERS or DATA
    /// frame's header ended among them.
    pub fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let mut active = false;
        while !bytes.is_empty() {
            let (skip, data) = if self.preface > 0 {
                (&mut self.preface, false)
            } else if self.payload > 0 {
                (&mut self.payload, self.in_data)
            } else {
                let n = (FRAME_HEADER_BYTES - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == FRAME_HEADER_BYTES {
                    let h = self.header;
                    self.payload =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    self.header_len = 0;
                    self.framed = true;
                    self.in_data = h[3] == DATA;
                    active |= matches!(h[3], DATA | HEADERS);
                }
                continue;
            };
            let n = (*skip).min(bytes.len());
            *skip -= n;
            if data {
                self.data += n as u64;
            }
            bytes = &bytes[n..];
        }
        active
    }
}

/// A connection's plaintext stream (`S`: TLS over an admitted socket)
/// whose requests and answers, and only those, count as its activity.
pub struct Watched<S> {
    inner: S,
    reads: FrameScanner,
    writes: FrameScanner,
    toucher: Toucher,
    /// Whether the connection limit was told the client set up HTTP/2.
    framed: bool,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, toucher: Toucher) -> Self {
        Watched {
            inner,
            reads: FrameScanner::from_client(),
            writes: FrameScanner::from_server(),
            toucher,
            framed: false,
        }
    }

    /// Ready once the connection was found idle (its server is to close
    /// it gracefully, see [`crate::inbound::Config::idle_drain_grace`]),
    /// or is closed (its server is to end).
    pub fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        self.toucher.closing()
    }

    /// What has the connection close gracefully, cut a grace later.
    pub fn drainer(&self) -> crate::inbound::Drainer {
        self.toucher.drainer()
    }
}

impl<S> Watched<S> {
    /// Tells the connection's [`crate::backlog`] its socket is full, if
    /// this write could not go on.
    fn note_blocked<T>(&self, result: &Poll<io::Result<T>>) {
        if result.is_pending() {
            self.toucher.blocked();
        }
    }
}

impl<S: Connected> Connected for Watched<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && this.reads.scan(&buf.filled()[before..]) {
            this.toucher.touch();
        }
        if !this.framed && this.reads.framed() {
            this.framed = true;
            this.toucher.framed();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            let data = this.writes.data();
            if this.writes.scan(&buf[..n]) {
                this.toucher.touch();
            }
            this.toucher.wrote(this.writes.data() - data);
        }
        this.note_blocked(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = result {
            let data = this.writes.data();
            let mut active = false;
            for buf in bufs {
                if n == 0 {
                    break;
                }
                let written = n.min(buf.len());
                active |= this.writes.scan(&buf[..written]);
                n -= written;
            }
            if active {
                this.toucher.touch();
            }
            this.toucher.wrote(this.writes.data() - data);
        }
        this.note_blocked(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        match result {
            Poll::Ready(Ok(())) => self.toucher.wrote(0),
            Poll::Pending => self.toucher.blocked(),
            Poll::Ready(Err(_)) => {}
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let len = (payload as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 1];
        f.extend(std::iter::repeat_n(0xAB, payload));
        f
    }

    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const WINDOW_UPDATE: u8 = 0x8;

    #[test]
    fn only_headers_and_data_frames_count_whatever_the_reads_they_arrive_in() {
        // A client's preface, settings, a ping, then a request (headers,
        // data), a window update, and another ping.
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // Where the header of each frame that counts ends.
        let mut counted = Vec::new();
        for (kind, payload) in [
            (SETTINGS, 18),
            (PING, 8),
            (HEADERS, 40),
            (DATA, 70_000),
            (WINDOW_UPDATE, 4),
            (PING, 8),
        ] {
            if matches!(kind, HEADERS | DATA) {
                counted.push(stream.len() + FRAME_HEADER_BYTES);
            }
            stream.extend(frame(kind, payload));
        }
        // Read in pieces of every size from 1 to 64 bytes, and whole: a
        // read is found active exactly when a counted header ends in it.
        for piece in (1..=64).chain([stream.len()]) {
            let mut scanner = FrameScanner::from_client();
            let mut offset = 0;
            for chunk in stream.chunks(piece) {
                let end = offset + chunk.len();
                let expected = counted.iter().any(|&at| offset < at && at <= end);
                assert_eq!(
                    scanner.scan(chunk),
                    expected,
                    "pieces of {piece}, at {offset}"
                );
                offset = end;
            }
        }
    }

    /// The server's answers as they reach the socket: exactly the payload
    /// bytes of DATA frames count as data, however the writes split them.
    #[test]
    fn only_data_payload_bytes_count_as_data_whatever_the_writes_they_are_in() {
        let mut stream = Vec::new();
        // The payload ranges of the DATA frames.
        let mut payloads = Vec::new();
        for (kind, payload) in [
            (SETTINGS, 6),
            (HEADERS, 30),
            (DATA, 1_000),
            (PING, 8),
            (DATA, 0),
            (DATA, 17),
            (HEADERS, 12),
        ] {
            if kind == DATA {
                let start = stream.len() + FRAME_HEADER_BYTES;
                payloads.push(start..start + payload);
            }
            stream.extend(frame(kind, payload));
        }
        for piece in (1..=40).chain([stream.len()]) {
            let mut scanner = FrameScanner::from_server();
            let mut end = 0;
            for chunk in stream.chunks(piece) {
                scanner.scan(chunk);
                end += chunk.len();
                let expected: usize = payloads
                    .iter()
                    .map(|p| p.end.min(end).saturating_sub(p.start))
                    .sum();
                assert_eq!(
                    scanner.data(),
                    expected as u64,
                    "pieces of {piece}, to {end}"
                );
            }
            assert_eq!(scanner.data(), 1_017);
        }
    }

    /// A client has set up HTTP/2 (and can be sent a GOAWAY) once a whole
    /// frame header came after its preface, not before, however the bytes
    /// are split.
    #[test]
    fn a_client_is_framed_once_a_whole_frame_header_follows_its_preface() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let settings = frame(SETTINGS, 0);
        let mut scanner = FrameScanner::from_client();
        scanner.scan(preface);
        assert!(!scanner.framed(), "framed by the preface alone");
        scanner.scan(&settings[..FRAME_HEADER_BYTES - 1]);
        assert!(!scanner.framed(), "framed by part of a header");
        scanner.scan(&settings[FRAME_HEADER_BYTES - 1..]);
        assert!(scanner.framed());
    }

    #[test]
    fn a_server_direction_has_no_preface() {
        let mut scanner = FrameScanner::from_server();
        assert!(!scanner.scan(&frame(SETTINGS, 0)));
        assert!(!scanner.scan(&frame(PING, 8)));
        assert!(scanner.scan(&frame(HEADERS, 3)));
        assert!(scanner.scan(&frame(DATA, 0)));
    }
}
