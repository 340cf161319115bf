//! The client end: one HTTP/1.1 request on the API socket, its answer parsed with `httparse`,
//! a chunked body decoded as it comes. What the server sends is checked and bounded like any
//! peer's input.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{bail, Context};

use super::{routes, Request, Response};

/// Largest answer head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Largest answer body, and longest NDJSON line.
const MAX_BODY: usize = 16 << 20;
/// Longest chunk-size line.
const MAX_CHUNK_LINE: usize = 1024;

/// An answer.
#[derive(Debug)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The JSON body; of a streamed (NDJSON) answer, its last line.
    pub body: serde_json::Value,
    /// True when the body was an NDJSON stream.
    pub streamed: bool,
}

/// The head of an answer.
struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
    ndjson: bool,
}

/// Reads and parses the answer head; what follows it stays in `r`.
fn read_head(r: &mut impl BufRead) -> anyhow::Result<Head> {
    let mut buf = Vec::new();
    loop {
        let before = buf.len();
        r.by_ref()
            .take((MAX_HEAD - before) as u64)
            .read_until(b'\n', &mut buf)
            .context("reading the API answer")?;
        if buf.len() == before {
            bail!("the VM closed the API connection without an answer");
        }
        if !buf.ends_with(b"\n") {
            bail!("the API answer's head exceeds {MAX_HEAD} bytes");
        }
        // 1xx answers (100 Continue) come before the real one.
        if buf.ends_with(b"\r\n\r\n") && buf.starts_with(b"HTTP/1.1 1") {
            buf.clear();
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf).context("malformed API answer")? {
            httparse::Status::Partial => continue,
            httparse::Status::Complete(_) => {
                let mut head = Head {
                    status: resp.code.unwrap_or(0),
                    chunked: false,
                    length: None,
                    ndjson: false,
                };
                for h in resp.headers.iter() {
                    let v = String::from_utf8_lossy(h.value);
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        head.chunked = v.to_ascii_lowercase().contains("chunked");
                    } else if h.name.eq_ignore_ascii_case("content-length") {
                        head.length = Some(v.trim().parse().context("bad Content-Length")?);
                    } else if h.name.eq_ignore_ascii_case("content-type") {
                        head.ndjson = v.contains("ndjson");
                    }
                }
                return Ok(head);
            }
        }
    }
}

/// A chunked body as a plain stream (chunk extensions and trailers are skipped).
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn line(&mut self) -> std::io::Result<String> {
        let mut l = Vec::new();
        (&mut self.inner)
            .take(MAX_CHUNK_LINE as u64)
            .read_until(b'\n', &mut l)?;
        if !l.ends_with(b"\n") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "truncated chunked body",
            ));
        }
        Ok(String::from_utf8_lossy(&l).trim().to_string())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        while self.left == 0 && !self.done {
            let size = self.line()?;
            let size = size.split(';').next().unwrap_or_default().trim();
            self.left = usize::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if self.left == 0 {
                // Trailers up to the empty line.
                while !self.line()?.is_empty() {}
                self.done = true;
            }
        }
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad("truncated chunk"));
        }
        self.left -= n;
        if self.left == 0 && !self.line()?.is_empty() {
            return Err(bad("chunk without its CRLF"));
        }
        Ok(n)
    }
}

/// Sends `method path` with an optional JSON body to the API at `socket`. A streamed answer
/// (NDJSON) calls `on_line` for each line as it arrives.
pub fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    mut on_line: impl FnMut(&serde_json::Value),
) -> anyhow::Result<HttpAnswer> {
    let mut conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the API socket {} (is `ferry run --api-socket` running?)",
            socket.display()
        )
    })?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if method != "GET" {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += &body;
    // A server that refuses the connection at once (too many) may close it before the request
    // is written; its answer is still there to read.
    let sent = conn.write_all(req.as_bytes());
    let mut r = BufReader::new(conn);
    let head = match (read_head(&mut r), sent) {
        (Ok(head), _) => head,
        (Err(e), Err(w)) => return Err(e.context(format!("sending the API request: {w}"))),
        (Err(e), Ok(())) => return Err(e),
    };
    let mut reader: Box<dyn Read> = match (head.chunked, head.length) {
        (true, _) => Box::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        }),
        (false, Some(n)) if n > MAX_BODY => bail!("the API answer's body exceeds {MAX_BODY} bytes"),
        (false, Some(n)) => Box::new(r.take(n as u64)),
        (false, None) => Box::new(r),
    };
    let parse = |line: &[u8]| -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(line)
            .with_context(|| format!("API answered {:?}", String::from_utf8_lossy(line)))
    };
    if head.ndjson {
        let mut lines = BufReader::new(reader);
        let mut last = None;
        loop {
            let mut line = Vec::new();
            (&mut lines)
                .take(MAX_BODY as u64)
                .read_until(b'\n', &mut line)
                .context("reading the API answer")?;
            if line.is_empty() {
                break;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v = parse(&line)?;
            on_line(&v);
            last = Some(v);
        }
        let body = last.context("the API's stream ended without a line")?;
        return Ok(HttpAnswer {
            status: head.status,
            body,
            streamed: true,
        });
    }
    let mut bytes = Vec::new();
    reader
        .by_ref()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut bytes)
        .context("reading the API answer")?;
    if bytes.len() > MAX_BODY {
        bail!("the API answer's body exceeds {MAX_BODY} bytes");
    }
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        parse(&bytes)?
    };
    Ok(HttpAnswer {
        status: head.status,
        body,
        streamed: false,
    })
}

/// Sends `request` to the API at `path`; calls `on_progress` for each progress event of a
/// migration and returns the final result.
pub fn call(
    path: &Path,
    request: &Request,
    mut on_progress: impl FnMut(&migration::Progress),
) -> anyhow::Result<Response> {
    let (method, uri, body) = routes::route_of(request);
    let mut bad_line = None;
    let answer = send(
        path,
        method,
        &uri,
        body.as_ref(),
        |line| match serde_json::from_value::<Response>(line.clone()) {
            Ok(Response::Progress(p)) => on_progress(&p),
            Ok(Response::Result { .. }) => {}
            Err(e) => bad_line = Some(format!("API streamed {line}: {e}")),
        },
    )?;
    if let Some(why) = bad_line {
        bail!(why);
    }
    let ok = (200..300).contains(&answer.status);
    Ok(match (ok, answer.streamed) {
        (true, true) => match serde_json::from_value::<Response>(answer.body.clone()) {
            Ok(r @ Response::Result { .. }) => r,
            _ => bail!("the API's stream ended without a result: {}", answer.body),
        },
        (true, false) => Response::ok(answer.body),
        (false, _) => Response::err(
            answer.body["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {}: {}", answer.status, answer.body)),
        ),
    })
}
