//! The endpoints: which path and method is which [`Request`], what body it takes, and which
//! status code each answer gets. docs/api/ferry-api.yaml documents exactly [`ROUTES`] (a test
//! holds them together).
use std::{io::Write, os::unix::net::UnixStream, sync::mpsc::Receiver, time::Duration};

use serde::Deserialize;

use super::{
    http::{self, NdjsonStream, ReadError},
    MigrateRequest, Request, Response, Supervisor, GONE, MAX_CONNECTIONS,
};

/// Every path starts with it.
pub const PREFIX: &str = "/api/v1";

/// What an endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Is the VMM there (answered without the supervisor).
    Ping,
    /// [`Request::Status`].
    Info,
    /// [`Request::Verify`].
    Verify,
    /// [`Request::MemoryHash`].
    MemoryHash,
    /// [`Request::Migrate`], answered as a stream.
    SendMigration,
    /// [`Request::Resume`].
    Resume,
    /// [`Request::CancelMigration`].
    CancelMigration,
    /// [`Request::Stop`].
    Shutdown,
}

/// Every endpoint: method, path below [`PREFIX`], what it does.
pub const ROUTES: &[(&str, &str, Endpoint)] = &[
    ("GET", "/vmm.ping", Endpoint::Ping),
    ("GET", "/vm.info", Endpoint::Info),
    ("PUT", "/vm.verify", Endpoint::Verify),
    ("GET", "/vm.memory-hash", Endpoint::MemoryHash),
    ("PUT", "/vm.send-migration", Endpoint::SendMigration),
    ("PUT", "/vm.resume", Endpoint::Resume),
    ("PUT", "/vm.cancel-migration", Endpoint::CancelMigration),
    ("PUT", "/vm.shutdown", Endpoint::Shutdown),
];

/// The method and full path of `endpoint`.
pub fn route(endpoint: Endpoint) -> (&'static str, String) {
    let (method, path, _) = ROUTES
        .iter()
        .find(|(_, _, e)| *e == endpoint)
        .copied()
        .unwrap_or(("GET", "/vmm.ping", Endpoint::Ping));
    (method, format!("{PREFIX}{path}"))
}

/// The endpoint of a request and the body it is sent with.
pub fn endpoint_of(request: &Request) -> (Endpoint, Option<serde_json::Value>) {
    match request {
        Request::Status => (Endpoint::Info, None),
        Request::Verify => (Endpoint::Verify, None),
        Request::MemoryHash => (Endpoint::MemoryHash, None),
        Request::Stop => (Endpoint::Shutdown, None),
        Request::CancelMigration => (Endpoint::CancelMigration, None),
        Request::Resume { force } => (
            Endpoint::Resume,
            Some(serde_json::json!({ "force": force })),
        ),
        Request::Migrate(m) => (Endpoint::SendMigration, serde_json::to_value(m).ok()),
    }
}

/// Method, full path and body of a request.
pub fn route_of(request: &Request) -> (&'static str, String, Option<serde_json::Value>) {
    let (endpoint, body) = endpoint_of(request);
    let (method, path) = route(endpoint);
    (method, path, body)
}

/// Method and full path of the ping (which has no [`Request`]), with its (absent) body.
pub fn route_of_ping() -> (&'static str, String, Option<serde_json::Value>) {
    let (method, path) = route(Endpoint::Ping);
    (method, path, None)
}

/// Why no endpoint matched.
enum Miss {
    /// No such path.
    Path,
    /// The path exists with these methods only.
    Method(String),
}

fn find(method: &str, path: &str) -> Result<Endpoint, Miss> {
    let rest = path.strip_prefix(PREFIX).ok_or(Miss::Path)?;
    let same_path: Vec<_> = ROUTES.iter().filter(|(_, p, _)| *p == rest).collect();
    if same_path.is_empty() {
        return Err(Miss::Path);
    }
    same_path
        .iter()
        .find(|(m, _, _)| *m == method)
        .map(|(_, _, e)| *e)
        .ok_or_else(|| {
            let allowed: Vec<_> = same_path.iter().map(|(m, _, _)| *m).collect();
            Miss::Method(allowed.join(", "))
        })
}

/// The body of `PUT /vm.resume` (may be empty: no force).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    #[serde(default)]
    force: bool,
}

/// The request an endpoint hands the supervisor, from its body; `None` for a ping.
fn request_of(endpoint: Endpoint, body: &[u8]) -> Result<Option<Request>, String> {
    Ok(Some(match endpoint {
        Endpoint::Ping => return Ok(None),
        Endpoint::Info => Request::Status,
        Endpoint::Verify => Request::Verify,
        Endpoint::MemoryHash => Request::MemoryHash,
        Endpoint::Shutdown => Request::Stop,
        Endpoint::CancelMigration => Request::CancelMigration,
        Endpoint::Resume if body.iter().all(u8::is_ascii_whitespace) => {
            Request::Resume { force: false }
        }
        Endpoint::Resume => {
            let b: ResumeBody = serde_json::from_slice(body)
                .map_err(|e| format!("the body must be {{\"force\": bool}}: {e}"))?;
            Request::Resume { force: b.force }
        }
        Endpoint::SendMigration => {
            let m: MigrateRequest = serde_json::from_slice(body)
                .map_err(|e| format!("the body must be a migration request: {e}"))?;
            Request::Migrate(m)
        }
    }))
}

/// Phrases of the supervisor's errors that mean "not in this state" (answered 409).
const CONFLICTS: &[&str] = &[
    "paused after Go",
    "nothing to resume",
    "without force",
    "not paused",
    "no migration is running",
    "too late",
    "a migration is running",
    "is stopping",
];

/// The status code of an error the supervisor answered.
fn error_status(why: &str) -> u16 {
    if why == GONE || why.starts_with("the VM ended") {
        503
    } else if CONFLICTS.iter().any(|c| why.contains(c)) {
        409
    } else {
        500
    }
}

/// Answers a connection over [`MAX_CONNECTIONS`] with 503 and closes it.
pub fn refuse_busy(mut conn: UnixStream) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = http::write_error(
        &mut conn,
        503,
        &format!("too many API connections ({MAX_CONNECTIONS} in use); retry"),
        "Retry-After: 1\r\n",
    );
    http::close_now(conn);
}

/// Serves one connection: reads its request, hands it to the supervisor, writes the answer,
/// closes.
pub(super) fn handle(mut conn: UnixStream, supervisor: &Supervisor) -> anyhow::Result<()> {
    let served = serve(&mut conn, supervisor);
    http::close(conn);
    served
}

fn serve(conn: &mut UnixStream, supervisor: &Supervisor) -> anyhow::Result<()> {
    conn.set_write_timeout(Some(http::WRITE_TIMEOUT))?;
    let req = match http::read_request(conn) {
        Ok(r) => r,
        Err(ReadError::Closed) => return Ok(()),
        Err(e) => {
            if let Some(status) = e.status() {
                http::write_error(conn, status, &e.to_string(), "")?;
            }
            return Err(e.into());
        }
    };
    tracing::debug!(method = %req.method, path = %req.path, "API request");
    let endpoint = match find(&req.method, &req.path) {
        Ok(e) => e,
        Err(Miss::Path) => {
            let why = format!("no endpoint {}", req.path);
            return Ok(http::write_error(conn, 404, &why, "")?);
        }
        Err(Miss::Method(allowed)) => {
            let why = format!("{} takes {allowed}, not {}", req.path, req.method);
            let allow = format!("Allow: {allowed}\r\n");
            return Ok(http::write_error(conn, 405, &why, &allow)?);
        }
    };
    let request = match request_of(endpoint, &req.body) {
        Ok(Some(r)) => r,
        Ok(None) => {
            let pong = serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
            });
            return Ok(http::write_json(conn, 200, &pong, "")?);
        }
        Err(why) => return Ok(http::write_error(conn, 400, &why, "")?),
    };
    let (responses, _answering) = supervisor.submit(request);
    if endpoint == Endpoint::SendMigration {
        stream(conn, &responses)
    } else {
        answer(conn, &responses)
    }
}

/// The first answer that is not progress; `None` when the supervisor dropped the request.
fn result(responses: &Receiver<Response>) -> Option<Response> {
    responses
        .iter()
        .find(|r| matches!(r, Response::Result { .. }))
}

/// Writes an error result with its status code.
fn write_failure(out: &mut impl Write, error: Option<String>) -> anyhow::Result<()> {
    let why = error.unwrap_or_else(|| "failed without a reason".into());
    Ok(http::write_error(out, error_status(&why), &why, "")?)
}

/// A plain answer: the result's data as the body, or the error with its status.
fn answer(conn: &mut UnixStream, responses: &Receiver<Response>) -> anyhow::Result<()> {
    match result(responses) {
        Some(Response::Result { ok: true, data, .. }) => {
            let data = data.unwrap_or_else(|| serde_json::json!({}));
            Ok(http::write_json(conn, 200, &data, "")?)
        }
        Some(Response::Result { error, .. }) => write_failure(conn, error),
        _ => write_failure(conn, Some(GONE.into())),
    }
}

/// A migration's answer. Refused at once (no progress yet): an error with its status code.
/// Otherwise 200 and a chunked NDJSON body: every event as it comes, the result last (which
/// may still be a failure: `{"event":"result","ok":false,...}`).
fn stream(conn: &mut UnixStream, responses: &Receiver<Response>) -> anyhow::Result<()> {
    let first = match responses.recv() {
        Ok(r @ Response::Progress(_)) | Ok(r @ Response::Result { ok: true, .. }) => r,
        Ok(Response::Result { error, .. }) => return write_failure(conn, error),
        Err(_) => return write_failure(conn, Some(GONE.into())),
    };
    let mut out = NdjsonStream::start(conn)?;
    let mut last = first;
    loop {
        out.line(&last)?;
        if matches!(last, Response::Result { .. }) {
            break;
        }
        last = match responses.recv() {
            Ok(r) => r,
            Err(_) => Response::err(GONE),
        };
    }
    Ok(out.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document lists exactly the routes served, with the methods served.
    #[test]
    fn the_openapi_document_lists_exactly_the_routes_served() {
        let doc: serde_json::Value =
            serde_norway::from_str(include_str!("../../../../docs/api/ferry-api.yaml"))
                .expect("the OpenAPI document is YAML");
        assert_eq!(
            doc["servers"][0]["url"],
            format!("http://localhost{PREFIX}")
        );
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "put", "post", "patch", "delete"].contains(&method.as_str()) {
                    documented.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn every_request_has_its_route_and_back() {
        for (method, path, endpoint) in ROUTES {
            assert_eq!(route(*endpoint), (*method, format!("{PREFIX}{path}")));
        }
        let requests = [
            Request::Status,
            Request::Verify,
            Request::MemoryHash,
            Request::Stop,
            Request::Resume { force: true },
        ];
        for r in requests {
            let (endpoint, body) = endpoint_of(&r);
            let (method, path) = route(endpoint);
            let back = find(method, &path).ok().expect("served");
            assert_eq!(back, endpoint);
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let again = request_of(back, body.as_bytes()).expect("parses");
            assert_eq!(
                serde_json::to_value(again).unwrap(),
                serde_json::to_value(Some(r)).unwrap()
            );
        }
    }

    #[test]
    fn supervisor_errors_get_their_status() {
        assert_eq!(error_status(GONE), 503);
        assert_eq!(
            error_status("the VM is not paused after a migration; nothing to resume"),
            409
        );
        assert_eq!(error_status("refusing to resume without force: ..."), 409);
        assert_eq!(error_status("connecting to 127.0.0.1:1: refused"), 500);
    }
}
