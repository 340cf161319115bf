//! The server's HTTP/1.1: one bounded request per connection (parsed with `httparse`), and
//! small hand-written responses, whole or chunked. Every connection is closed after its
//! answer (`Connection: close`), so nothing is left to a keep-alive state machine.
use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use serde::Serialize;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 << 10;
/// Largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;
/// Longest a client may take to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one write of an answer may block on a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed request.
#[derive(Debug)]
pub struct HttpRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without a query.
    pub path: String,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
}

/// Why a request could not be read; each maps onto a status code and an error body.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed the connection before a full request head.
    #[error("the client closed the connection")]
    Closed,
    /// Not HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
    /// The head is larger than [`MAX_HEAD`].
    #[error("the request head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The body is larger than [`MAX_BODY`].
    #[error("the request body exceeds {MAX_BODY} bytes")]
    BodyTooLarge,
    /// A body without Content-Length (chunked uploads are not taken).
    #[error("a request body needs a Content-Length")]
    LengthRequired,
    /// Content-Length is not a number.
    #[error("bad Content-Length")]
    BadLength,
    /// The request was not complete within [`REQUEST_TIMEOUT`].
    #[error("the request was not complete within {REQUEST_TIMEOUT:?}")]
    Timeout,
    /// Reading failed.
    #[error("reading the request")]
    Io(#[source] std::io::Error),
}

impl ReadError {
    /// The status code the client gets (none when it is gone).
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            ReadError::Closed | ReadError::Io(_) => return None,
            ReadError::Malformed(_) | ReadError::BadLength => 400,
            ReadError::HeadTooLarge => 431,
            ReadError::BodyTooLarge => 413,
            ReadError::LengthRequired => 411,
            ReadError::Timeout => 408,
        })
    }
}

/// Reads more of `conn` into `buf` without passing `deadline`; returns the byte count (0 at
/// the end of the stream).
fn read_some(conn: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> Result<usize, ReadError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        conn.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        match conn.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::Timeout)
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Reads one request: the head up to [`MAX_HEAD`], the body up to [`MAX_BODY`], all within
/// [`REQUEST_TIMEOUT`] (a client that sends a byte now and then cannot hold the thread longer).
pub fn read_request(conn: &mut UnixStream) -> Result<HttpRequest, ReadError> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = vec![0u8; MAX_HEAD];
    let mut have = 0;
    let (method, path, head_len, length, continue_wanted) = loop {
        if have == buf.len() {
            return Err(ReadError::HeadTooLarge);
        }
        let n = read_some(conn, &mut buf[have..], deadline)?;
        if n == 0 {
            return Err(if have == 0 {
                ReadError::Closed
            } else {
                ReadError::Malformed(httparse::Error::Token)
            });
        }
        have += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..have]) {
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
            Err(e) => return Err(ReadError::Malformed(e)),
            Ok(httparse::Status::Complete(head_len)) => {
                let mut length = None;
                let mut continue_wanted = false;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value).map_err(|_| ReadError::BadLength)?;
                        let n: usize = v.trim().parse().map_err(|_| ReadError::BadLength)?;
                        if length.is_some_and(|l| l != n) {
                            return Err(ReadError::BadLength);
                        }
                        length = Some(n);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(ReadError::LengthRequired);
                    } else if h.name.eq_ignore_ascii_case("expect") {
                        continue_wanted = h.value.eq_ignore_ascii_case(b"100-continue");
                    }
                }
                let method = req.method.unwrap_or_default().to_string();
                let target = req.path.unwrap_or_default();
                let path = target.split(['?', '#']).next().unwrap_or_default();
                break (
                    method,
                    path.to_string(),
                    head_len,
                    length.unwrap_or(0),
                    continue_wanted,
                );
            }
        }
    };
    if length > MAX_BODY {
        return Err(ReadError::BodyTooLarge);
    }
    let mut body = buf[head_len..have].to_vec();
    if body.len() > length {
        // Pipelined bytes after the body: one request per connection, so they are dropped.
        body.truncate(length);
    }
    if body.len() < length && continue_wanted {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(ReadError::Io)?;
    }
    let mut chunk = [0u8; 4096];
    while body.len() < length {
        let want = (length - body.len()).min(chunk.len());
        let n = read_some(conn, &mut chunk[..want], deadline)?;
        if n == 0 {
            return Err(ReadError::Malformed(httparse::Error::Token));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(HttpRequest { method, path, body })
}

/// Longest a closing connection waits for the rest of a request it did not read.
const LINGER: Duration = Duration::from_secs(2);

/// Closes a connection after its answer without losing the answer: a Unix socket closed with
/// unread input makes the client's read fail (ECONNRESET) instead of ending, so the unread
/// rest of a refused request (a body too large, say) is read and dropped first, bounded in
/// time and size.
pub fn close(mut conn: UnixStream) {
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut buf = [0u8; 4096];
    while drained < 4 * MAX_BODY {
        match read_some(&mut conn, &mut buf, deadline) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Drops what a client already sent without waiting for more (see [`close`]).
pub fn close_now(mut conn: UnixStream) {
    let _ = conn.shutdown(std::net::Shutdown::Write);
    if conn.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < MAX_BODY {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

/// The reason phrase of the codes the API uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes a whole JSON answer; `extra` are more header lines (each ending in CRLF).
pub fn write_json(
    out: &mut impl Write,
    status: u16,
    body: &impl Serialize,
    extra: &str,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).map_err(std::io::Error::other)?;
    write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n",
        reason(status),
        body.len()
    )?;
    out.write_all(&body)?;
    out.flush()
}

/// Writes an error answer: `{"error": why}`.
pub fn write_error(
    out: &mut impl Write,
    status: u16,
    why: &str,
    extra: &str,
) -> std::io::Result<()> {
    write_json(out, status, &serde_json::json!({ "error": why }), extra)
}

/// A chunked NDJSON answer: one JSON value a line, each line its own chunk so a client sees it
/// as it happens.
pub struct NdjsonStream<'a, W: Write>(&'a mut W);

impl<'a, W: Write> NdjsonStream<'a, W> {
    /// Writes the head of a 200 answer.
    pub fn start(out: &'a mut W) -> std::io::Result<Self> {
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )?;
        out.flush()?;
        Ok(NdjsonStream(out))
    }

    /// Writes one line.
    pub fn line(&mut self, v: &impl Serialize) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        line.push(b'\n');
        write!(self.0, "{:x}\r\n", line.len())?;
        self.0.write_all(&line)?;
        self.0.write_all(b"\r\n")?;
        self.0.flush()
    }

    /// Ends the body.
    pub fn finish(self) -> std::io::Result<()> {
        self.0.write_all(b"0\r\n\r\n")?;
        self.0.flush()
    }
}
