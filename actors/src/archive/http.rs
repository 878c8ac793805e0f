//! Object stores reached over HTTP (S3-compatible, GCS, WebDAV), every
//! answer's body bounded.
//!
//! object_store collects some bodies whole before the caller sees them: the
//! body of every error answer (a 404 or a 403 included, for its message),
//! an S3 listing page, a WebDAV listing (of the whole archive) and the
//! answer to a write. Read through the stock client, a server, or whoever
//! sits between it and the node, could send such a body without end, and
//! the node would buffer it until the request timed out. Every store opened
//! here goes through [`Connector`], which cuts a body as soon as it passes
//! its bound. An error answer's body ends at [`MAX_ERROR_BODY_BYTES`] (or
//! up to three bytes later, not to split a UTF-8 character), the rest
//! dropped with the connection: it is only a message, and a 404 with a
//! long text body is still read as not found. Any other body fails past the archive's
//! `max-object-bytes`, with an error of kind `Decode`: object_store does
//! not send the request again for it (a GET's body it may ask for again
//! by range, but the archive's own reads stop at the size the object
//! claimed first). A body's size hint is bounded
//! too: object_store reserves what a body's `Content-Length` claims before
//! collecting it, and a claim of 2^62 bytes aborted the process.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreScheme};

/// The most bytes of an error answer's body read: enough for any store's
/// error message (S3's are under a kilobyte).
pub(super) const MAX_ERROR_BODY_BYTES: u64 = 64 << 10;

/// Opens the store `url` names (`s3://`, `gs://`, `http(s)://`) with
/// `options` (object_store's configuration keys, case-insensitive; keys a
/// store does not know are ignored), every body it reads bounded: see the
/// module's documentation. Returns the store and the path within it.
/// Other schemes object_store knows (`memory://`, Azure's) are refused:
/// an archive in memory keeps nothing.
pub(super) fn open(
    url: &url::Url,
    options: impl IntoIterator<Item = (String, String)>,
    max_body_bytes: u64,
) -> Result<(Box<dyn ObjectStore>, Path), object_store::Error> {
    let connector = Connector { max_body_bytes };
    let (scheme, path) = ObjectStoreScheme::parse(url)?;
    let path = Path::parse(path)?;
    // As `object_store::parse_url_opts` builds them, with the connector.
    macro_rules! build {
        ($builder:ty, $url:expr) => {{
            let builder = options.into_iter().fold(
                <$builder>::new().with_url($url.to_string()),
                |builder, (key, value)| match key.to_ascii_lowercase().parse() {
                    Ok(key) => builder.with_config(key, value),
                    Err(_) => builder,
                },
            );
            Box::new(builder.with_http_connector(connector).build()?) as Box<dyn ObjectStore>
        }};
    }
    let store = match scheme {
        ObjectStoreScheme::AmazonS3 => build!(object_store::aws::AmazonS3Builder, url),
        ObjectStoreScheme::GoogleCloudStorage => {
            build!(object_store::gcp::GoogleCloudStorageBuilder, url)
        }
        ObjectStoreScheme::Http => {
            build!(
                object_store::http::HttpBuilder,
                &url[..url::Position::BeforePath]
            )
        }
        other => {
            return Err(object_store::Error::Generic {
                store: "archive",
                source: format!("{other:?} stores are not supported").into(),
            });
        }
    };
    Ok((store, path))
}

/// Builds object_store's own HTTP client and bounds the body of every
/// answer it gets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Connector {
    /// The bound of a successful answer's body.
    pub(super) max_body_bytes: u64,
}

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Service {
            inner: ReqwestConnector::default().connect(options)?,
            max_body_bytes: self.max_body_bytes,
        }))
    }
}

#[derive(Debug)]
struct Service {
    inner: HttpClient,
    max_body_bytes: u64,
}

#[async_trait::async_trait]
impl HttpService for Service {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = self.inner.execute(request).await?;
        let limit = if response.status().is_success() {
            self.max_body_bytes
        } else {
            MAX_ERROR_BODY_BYTES
        };
        let truncate = !response.status().is_success();
        let (parts, inner) = response.into_parts();
        let body = BoundedBody {
            inner,
            limit,
            truncate,
            read: 0,
        };
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// A body that fails as soon as it passes `limit` bytes, or, if
/// `truncate`, ends there (or up to three bytes later, to end a UTF-8
/// character: [`text_cut`]).
#[derive(Debug)]
struct BoundedBody {
    inner: HttpResponseBody,
    limit: u64,
    truncate: bool,
    read: u64,
}

/// A body past its bound.
#[derive(Debug, thiserror::Error)]
#[error("an answer's body passed {limit} bytes, the most read of it")]
pub(super) struct BodyTooLong {
    limit: u64,
}

impl Body for BoundedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        if this.read > this.limit {
            return Poll::Ready(None);
        }
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            let room = this.limit - this.read;
            this.read += data.len() as u64;
            if this.read > this.limit {
                if this.truncate {
                    // `room` is below the frame's length, a `usize`.
                    let kept = data.slice(..text_cut(data, room as usize));
                    return Poll::Ready((!kept.is_empty()).then(|| Ok(Frame::data(kept))));
                }
                let error = BodyTooLong { limit: this.limit };
                return Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Decode, error))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.read > self.limit || self.inner.is_end_stream()
    }

    /// The inner body's claim, at most the bound: what object_store
    /// reserves before collecting a body.
    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower().min(self.limit));
        hint
    }
}

/// Where to cut `data` at `at` or just after: past the continuation
/// bytes (three at most) of a UTF-8 character begun before `at`, so that
/// a message cut there still reads as text (object_store reads an error
/// body as UTF-8, and one that is not makes a 404 a generic error).
fn text_cut(data: &[u8], at: usize) -> usize {
    let continues = |i: usize| data.get(i).is_some_and(|b| b & 0xC0 == 0x80);
    (at..at + 3).find(|&i| !continues(i)).unwrap_or(at + 3)
}

/// The bound a body was cut at, if `error` is that cut.
pub(super) fn body_cut_at(error: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(cut) = error.downcast_ref::<BodyTooLong>() {
            return Some(cut.limit);
        }
        source = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use object_store::ObjectStoreExt;
    use object_store::path::Path;

    use super::*;

    /// The bytes of a flood's body: far past every bound below, and small
    /// enough that a client without them reads it whole (and fails the
    /// test) instead of running out of memory.
    const FLOOD_BYTES: usize = 64 << 20;

    /// What the server below saw.
    #[derive(Default)]
    struct Sent {
        /// Floods whose connection the client closed before their end.
        floods_cut: AtomicU64,
    }

    /// An HTTP server on 127.0.0.1: `GET /archive/small` is a five-byte
    /// object, `GET /archive/missing` a 404 with a short message, `GET
    /// /archive/flood` a 404 with a body of `FLOOD_BYTES`, and a listing
    /// (`PROPFIND`) a 207 with as long a body. Returns its address.
    fn server(sent: Arc<Sent>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let (Ok(stream), sent) = (stream, sent.clone()) else {
                    continue;
                };
                std::thread::spawn(move || serve(stream, &sent));
            }
        });
        addr
    }

    /// Answers the requests of one connection, in turn.
    fn serve(mut stream: TcpStream, sent: &Sent) {
        loop {
            let mut head = Vec::new();
            let mut byte = [0u8];
            while !head.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let line = head.lines().next().unwrap_or_default().to_owned();
            let answer: &[u8] = match line.split(' ').take(2).collect::<Vec<_>>()[..] {
                ["GET", "/archive/small"] => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                ["GET", "/archive/missing"] => {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno object"
                }
                ["GET", "/archive/flood"] => {
                    return flood(stream, "404 Not Found", true, "x", sent);
                }
                // A length past any memory, then the same flood.
                ["GET", "/archive/claim"] => {
                    return flood(stream, "404 Not Found", false, "x", sent);
                }
                // Two-byte characters, the bound falling inside one.
                ["GET", "/archive/accents"] => {
                    return flood(stream, "404 Not Found", true, "é", sent);
                }
                ["PROPFIND", _] => return flood(stream, "207 Multi-Status", true, "x", sent),
                _ => b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            };
            if stream.write_all(answer).is_err() {
                return;
            }
        }
    }

    /// A body of about `FLOOD_BYTES` for `status`, `chunked` or else
    /// claiming 2^62 bytes: an `x`, then `unit` over and over, in chunks of
    /// 12 KiB (which the bounds are not multiples of); counted in `sent`
    /// if the client closes the connection before its end.
    fn flood(mut stream: TcpStream, status: &str, chunked: bool, unit: &str, sent: &Sent) {
        let text = unit.repeat(0x3000 / unit.len());
        let frame = |text: &str| match chunked {
            true => format!("{:x}\r\n{text}\r\n", text.len()),
            false => text.to_owned(),
        };
        let (first, chunk) = (frame("x"), frame(&text));
        let head = match chunked {
            true => "Transfer-Encoding: chunked",
            false => "Content-Length: 4611686018427387904",
        };
        let head = format!("HTTP/1.1 {status}\r\n{head}\r\n\r\n");
        let mut body = vec![head.as_bytes(), first.as_bytes()];
        body.extend(std::iter::repeat_n(chunk.as_bytes(), FLOOD_BYTES / 0x3000));
        if chunked {
            body.push(b"0\r\n\r\n");
        }
        if body.iter().any(|part| stream.write_all(part).is_err()) {
            sent.floods_cut.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn store(addr: std::net::SocketAddr, max_body_bytes: u64) -> (Box<dyn ObjectStore>, Path) {
        let url = url::Url::parse(&format!("http://{addr}/archive")).unwrap();
        // An hour: only a bound or the body's end ends a flood.
        let options = [("timeout", "1h"), ("allow_http", "true")];
        let options = options.map(|(k, v)| (k.to_owned(), v.to_owned()));
        open(&url, options, max_body_bytes).unwrap()
    }

    /// The start of `error`'s message (a body read whole would be in it).
    fn brief(error: &object_store::Error) -> String {
        error.to_string().chars().take(300).collect()
    }

    /// An error answer's body is read up to `MAX_ERROR_BODY_BYTES` and
    /// ends there, any other answer's (here a WebDAV listing) fails past
    /// the archive's `max-object-bytes`, and either way the connection is
    /// closed; answers within their bounds are read as before. Without the bounds both
    /// floods are read whole (a server that never ends them had the test
    /// killed for memory, 24 GiB in under a minute).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_answer_body_is_cut_at_its_bound() {
        let sent = Arc::new(Sent::default());
        let (store, root) = store(server(sent.clone()), 1 << 20);
        let guard = Duration::from_secs(60);

        let small = store.get(&root.clone().join("small")).await.unwrap();
        assert_eq!(small.bytes().await.unwrap(), Bytes::from_static(b"hello"));
        let missing = store.get(&root.clone().join("missing")).await.unwrap_err();
        assert!(
            matches!(missing, object_store::Error::NotFound { .. }),
            "{missing}"
        );

        // A 404 whose body runs past the bound, and one claiming 2^62 bytes
        // (object_store reserved what a body claims before collecting it,
        // and the process aborted): each still not found, its message
        // the body's first `MAX_ERROR_BODY_BYTES`.
        for name in ["flood", "claim"] {
            let read = tokio::time::timeout(guard, store.get(&root.clone().join(name))).await;
            let error = read
                .expect("the 404's body was read for a minute")
                .unwrap_err();
            assert!(
                matches!(error, object_store::Error::NotFound { .. }),
                "{name}: {}",
                brief(&error)
            );
            let message = error.to_string();
            let body = message.split(|c| c != 'x').map(str::len).max();
            assert_eq!(body, Some(MAX_ERROR_BODY_BYTES as usize), "{name}");
        }
        // Cut at the bound, the body would end inside a character and not
        // read as text: the 404 was a generic error. The cut ends the
        // character, a byte past the bound: an `x`, then 32,768 of them.
        let read = tokio::time::timeout(guard, store.get(&root.clone().join("accents"))).await;
        let error = read
            .expect("the 404's body was read for a minute")
            .unwrap_err();
        assert!(
            matches!(error, object_store::Error::NotFound { .. }),
            "accents: {}",
            brief(&error)
        );
        let accents = error.to_string().matches('é').count();
        assert_eq!(accents, MAX_ERROR_BODY_BYTES as usize / 2);

        use futures::TryStreamExt;
        let listing = tokio::time::timeout(guard, store.list(Some(&root)).try_collect::<Vec<_>>());
        let error = listing
            .await
            .expect("the listing was read for a minute")
            .unwrap_err();
        assert_eq!(body_cut_at(&error), Some(1 << 20), "{}", brief(&error));

        // The lookup of a batch over that listing fails as too long.
        let id = soma_types::ChainId(soma_types::Digest([7; 32]));
        let config = super::super::Config::new("https://archive");
        let archive = super::super::Archive::with_store(store.into(), root, config, id);
        match archive.batch_holding(150, 100).await {
            Err(super::super::ArchiveError::ListingTooLong { reason, .. }) => {
                assert_eq!(reason, "passed 1048576 bytes");
            }
            other => panic!("{other:?}"),
        }

        // Every flood's connection closed by the node: the writes failed.
        let closed = async {
            while sent.floods_cut.load(Ordering::SeqCst) < 5 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(guard, closed)
            .await
            .expect("a cut body's connection left open");
        // Three 404s and two listings (the lookup's and the one above).
        assert_eq!(sent.floods_cut.load(Ordering::SeqCst), 5);
    }
}
