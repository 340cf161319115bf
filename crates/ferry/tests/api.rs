//! The HTTP API through the real socket of real `ferry` processes: every endpoint, its
//! successes and its errors, each answer checked against docs/api/ferry-api.yaml (the schema
//! the document gives for that path, method and status); the socket's mode; `ferry remote`;
//! the bounds on a request's time and on connections.
mod common;
use common::{
    http, http_raw, parse_reply, spawn_receiver, text, wait_for_socket, HttpReply, Proc, TempDir,
    PATIENCE,
};

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{json, Value};

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A VM running `dirty` with its API socket at `api`.
fn vm(api: &Path) -> Proc {
    let child = ferry()
        .args(["run", "--workload", "dirty", "--memory", "64M"])
        .args(["--working-set", "8M", "--serial", "off", "--json"])
        .args(["--timeout", "240s", "--api-socket", api.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(api);
    Proc(Some(child), None)
}

/// The OpenAPI document, as JSON.
struct Doc(Value);

impl Doc {
    fn load() -> Doc {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/ferry-api.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_norway::from_str(&yaml).expect("the document is YAML");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        Doc(doc)
    }

    /// `v` with every `$ref` inside replaced by what it points at (the document has no
    /// cycles; a depth bound says so if one appears).
    fn resolve(&self, v: &Value, depth: u32) -> Value {
        assert!(depth < 32, "$ref cycle in the document");
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    let pointer = r.strip_prefix('#').expect("local $ref");
                    let target = self
                        .0
                        .pointer(pointer)
                        .unwrap_or_else(|| panic!("$ref {r} points nowhere"));
                    return self.resolve(target, depth + 1);
                }
                Value::Object(
                    o.iter()
                        .map(|(k, v)| (k.clone(), self.resolve(v, depth + 1)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(|v| self.resolve(v, depth + 1)).collect()),
            other => other.clone(),
        }
    }

    /// The schema of the answer to `method path` with `status` and content type `ctype`: the
    /// documented status, else the operation's `default`; for a path the document does not
    /// have, the `Error` schema.
    fn schema(&self, method: &str, path: &str, status: u16, ctype: &str) -> Value {
        let op = &self.0["paths"][path][method.to_ascii_lowercase()];
        let response = if op.is_null() {
            assert!(
                status == 404 || status == 405,
                "{method} {path} is not documented"
            );
            return self.resolve(&json!({"$ref": "#/components/schemas/Error"}), 0);
        } else {
            let r = &op["responses"];
            let r = if r[status.to_string()].is_null() {
                &r["default"]
            } else {
                &r[status.to_string()]
            };
            self.resolve(r, 0)
        };
        let schema = &response["content"][ctype]["schema"];
        assert!(
            !schema.is_null(),
            "{method} {path} {status}: no {ctype} schema in {response}"
        );
        schema.clone()
    }

    /// Checks one answer against the document; returns its JSON (a stream: its lines).
    fn check(&self, method: &str, path: &str, r: &HttpReply) -> Vec<Value> {
        let ctype = r.header("content-type").expect("Content-Type");
        let schema = self.schema(method, path, r.status, ctype);
        let validator = jsonschema::draft202012::new(&schema)
            .unwrap_or_else(|e| panic!("schema of {method} {path} {}: {e}", r.status));
        let values = if ctype == "application/x-ndjson" {
            assert!(r.chunked, "a stream comes chunked");
            r.lines()
        } else {
            vec![r.json()]
        };
        for v in &values {
            let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
            assert!(
                errors.is_empty(),
                "{method} {path} {} answered {v}, which the document does not allow: {errors:?}",
                r.status
            );
        }
        values
    }

    /// One call, checked; asserts the status.
    fn call(
        &self,
        api: &Path,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
    ) -> Value {
        let r = http(api, method, path, body.as_ref());
        let mut values = self.check(method, path, &r);
        assert_eq!(r.status, status, "{method} {path}: {:?}", text(&r.body));
        if values.len() == 1 {
            values.pop().unwrap()
        } else {
            Value::Array(values)
        }
    }

    /// Raw bytes, answered with `status` and a documented error.
    fn raw(&self, api: &Path, raw: &[u8], path: &str, method: &str, status: u16) -> HttpReply {
        let r = http_raw(api, raw);
        self.check(method, path, &r);
        assert_eq!(r.status, status, "{:?}", text(&r.body));
        r
    }
}

#[test]
fn the_openapi_document_is_valid_and_every_schema_compiles() {
    let doc = Doc::load();
    for (name, schema) in doc.0["components"]["schemas"].as_object().unwrap() {
        let s = doc.resolve(schema, 0);
        jsonschema::draft202012::new(&s).unwrap_or_else(|e| panic!("schema {name}: {e}"));
    }
    for (path, item) in doc.0["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["operationId"].is_string(),
                "{method} {path}: operationId"
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("200"), "{method} {path}: success");
            assert!(responses.contains_key("default"), "{method} {path}: errors");
            doc.resolve(op, 0);
        }
    }
    // The schemas bite: answers the server must never give are refused.
    let info = doc.schema("GET", "/vm.info", 200, "application/json");
    let info = jsonschema::draft202012::new(&info).unwrap();
    let good = json!({"state": "running", "uptime_ms": 1.0, "progress": 3, "ram_bytes": 4096,
                      "unknown_migration": null, "shadow": null, "io_queues": null});
    assert!(info.is_valid(&good));
    let mut bad = good.clone();
    bad["state"] = "bogus".into();
    assert!(!info.is_valid(&bad));
    let mut bad = good.clone();
    bad["undocumented"] = 1.into();
    assert!(!info.is_valid(&bad));
    let line = doc.schema("PUT", "/vm.send-migration", 200, "application/x-ndjson");
    let line = jsonschema::draft202012::new(&line).unwrap();
    assert!(line.is_valid(&json!({"event": "result", "ok": false, "error": "refused"})));
    assert!(!line.is_valid(&json!({"event": "result", "ok": true, "error": "refused"})));
    assert!(!line.is_valid(&json!({"event": "result", "ok": true,
                                   "data": {"outcome": "maybe"}})));
    let error = doc.schema("GET", "/vm.nothing", 404, "application/json");
    assert!(!jsonschema::draft202012::new(&error)
        .unwrap()
        .is_valid(&json!({"message": "x"})));
}

#[test]
fn every_endpoint_answers_as_its_openapi_document_says() {
    let doc = Doc::load();
    let dir = TempDir::new("api-endpoints");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    let src = vm(&a);
    let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket is its owner's only");

    let ping = doc.call(&a, "GET", "/vmm.ping", None, 200);
    assert_eq!(ping["pid"], src.0.as_ref().unwrap().id());
    let info = doc.call(&a, "GET", "/vm.info", None, 200);
    assert_eq!(info["state"], "running");
    assert_eq!(info["ram_bytes"], 64 << 20);
    let v = doc.call(&a, "PUT", "/vm.verify", None, 200);
    assert_eq!(v["status"], 0, "ledger broken: {v}");
    let h = doc.call(&a, "GET", "/vm.memory-hash", None, 200);
    assert!(!h["memory_hash"].as_str().unwrap().is_empty());

    // Resume only applies to a VM paused after Go: a conflict either way.
    for body in [
        None,
        Some(json!({"force": true})),
        Some(json!({"force": false})),
    ] {
        let e = doc.call(&a, "PUT", "/vm.resume", body, 409);
        assert!(
            e["error"].as_str().unwrap().contains("nothing to resume"),
            "{e}"
        );
    }
    // Cancel applies to a running migration only.
    let e = doc.call(&a, "PUT", "/vm.cancel-migration", None, 409);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("no migration is running"),
        "{e}"
    );
    // A migration to a peer that accepts and never answers runs until cancelled: the cancel
    // answers 200, the migration's own request gets the error, the VM keeps running.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = silent.local_addr().unwrap().to_string();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Holds the connection open, silent, until the test ends.
        let _ = accepted_tx.send(silent.accept().map(|(s, _)| s));
    });
    let a2 = a.clone();
    let sending = std::thread::spawn(move || {
        http(&a2, "PUT", "/vm.send-migration", Some(&json!({ "to": to })))
    });
    common::wait_until("the source reports the migration", PATIENCE, || {
        doc.call(&a, "GET", "/vm.info", None, 200)["state"] == "migrating"
    });
    // Cancel once the source is connected to the silent peer (cancelling before it connects
    // is another case; waiting on the accept keeps this one deterministic on a slow machine).
    let held = accepted
        .recv_timeout(PATIENCE)
        .expect("the source connects to the peer")
        .unwrap();
    let c = doc.call(&a, "PUT", "/vm.cancel-migration", None, 200);
    assert_eq!(c, json!({"cancelled": true}));
    let r = sending.join().unwrap();
    let lines = doc.check("PUT", "/vm.send-migration", &r);
    let last = lines.last().cloned().unwrap_or_default();
    assert!(text(&r.body).contains("cancelled"), "{} {last}", r.status);
    drop(held);
    assert_eq!(
        doc.call(&a, "GET", "/vm.info", None, 200)["state"],
        "running"
    );

    // Bodies that are not what the endpoint takes.
    let bad = |path: &str, body: &str| {
        let raw = format!(
            "PUT /api/v1{path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        doc.raw(&a, raw.as_bytes(), path, "PUT", 400)
    };
    bad("/vm.resume", r#"{"force":tr"#);
    bad("/vm.resume", r#"{"forced":true}"#);
    bad("/vm.send-migration", "");
    bad("/vm.send-migration", r#"{"downtime_ms":50}"#);
    bad("/vm.send-migration", r#"{"to":"127.0.0.1:1","downtime":5}"#);
    bad("/vm.send-migration", "not json");

    // A migration to a port nobody listens on fails at once; the VM keeps running.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = doc.call(
        &a,
        "PUT",
        "/vm.send-migration",
        Some(json!({"to": format!("127.0.0.1:{port}")})),
        500,
    );
    assert!(e["error"].as_str().unwrap().contains("refused"), "{e}");
    assert_eq!(
        doc.call(&a, "GET", "/vm.info", None, 200)["state"],
        "running"
    );

    // Paths and methods the server does not have.
    doc.call(&a, "GET", "/vm.nothing", None, 404);
    let r = http_raw(&a, b"GET /nothing HTTP/1.1\r\n\r\n");
    doc.check("GET", "/nothing", &r);
    assert_eq!(r.status, 404);
    for (method, path, allow) in [
        ("POST", "/vm.info", "GET"),
        ("PUT", "/vmm.ping", "GET"),
        ("GET", "/vm.shutdown", "PUT"),
        ("DELETE", "/vm.send-migration", "PUT"),
    ] {
        let r = http(&a, method, path, None);
        doc.check(method, path, &r);
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow));
    }
    assert_eq!(
        doc.call(&a, "GET", "/vm.info", None, 200)["state"],
        "running"
    );

    // Requests out of bounds.
    let huge = "PUT /api/v1/vm.send-migration HTTP/1.1\r\nContent-Length: 70000\r\n\r\n{";
    doc.raw(&a, huge.as_bytes(), "/vm.send-migration", "PUT", 413);
    let long_head = format!(
        "GET /api/v1/vm.info HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "x".repeat(9000)
    );
    doc.raw(&a, long_head.as_bytes(), "/vm.info", "GET", 431);
    let chunked = "PUT /api/v1/vm.resume HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    doc.raw(&a, chunked.as_bytes(), "/vm.resume", "PUT", 411);
    doc.raw(&a, b"HELLO THERE\r\n\r\n", "/vm.info", "GET", 400);
    let bad_length = "PUT /api/v1/vm.resume HTTP/1.1\r\nContent-Length: many\r\n\r\n";
    doc.raw(&a, bad_length.as_bytes(), "/vm.resume", "PUT", 400);
    // curl's Expect: 100-continue is honoured.
    let expect =
        "PUT /api/v1/vm.resume HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 15\r\n\r\n";
    let mut s = UnixStream::connect(&a).unwrap();
    s.write_all(expect.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"force":true}"#).unwrap();
    s.write_all(b" ").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let r = parse_reply(&rest);
    doc.check("PUT", "/vm.resume", &r);
    assert_eq!(r.status, 409);

    // `ferry remote` speaks the same API.
    let remote = |args: &[&str]| {
        let out = ferry()
            .args(["remote", "--api-socket", a.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
        (out.status.code(), v)
    };
    let (code, v) = remote(&["info"]);
    assert_eq!(code, Some(0));
    assert_eq!(v["state"], "running");
    let (code, v) = remote(&["ping"]);
    assert_eq!((code, &v["pid"]), (Some(0), &ping["pid"]));
    let (code, v) = remote(&["resume", "--force"]);
    assert_eq!(code, Some(1));
    assert!(v["error"].as_str().unwrap().contains("nothing to resume"));

    // The real migration: a stream of progress events, the report last.
    let (dst, addr) = spawn_receiver(
        ferry()
            .args([
                "receive",
                "--listen",
                "127.0.0.1:0",
                "--serial",
                "off",
                "--json",
            ])
            .args(["--accept-timeout", "120s", "--timeout", "240s"])
            .args(["--api-socket", b.to_str().unwrap()]),
    );
    let r = http(
        &a,
        "PUT",
        "/vm.send-migration",
        Some(&json!({"to": addr, "debug_hash": true})),
    );
    let lines = doc.check("PUT", "/vm.send-migration", &r);
    assert_eq!(r.status, 200, "{:?}", text(&r.body));
    let (last, events) = lines.split_last().unwrap();
    assert!(!events.is_empty(), "progress came before the result");
    assert!(events.iter().all(|e| e["event"] == "progress"));
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["data"]["outcome"], "completed");
    assert_eq!(last["data"]["destination"], addr);
    let out = src.wait_output(PATIENCE);
    assert_eq!(out.status.code(), Some(0));
    assert!(!a.exists(), "the source removed its socket");

    // The destination serves the same API; stopping it ends its process.
    wait_for_socket(&b);
    assert_eq!(
        doc.call(&b, "GET", "/vm.info", None, 200)["state"],
        "running"
    );
    let hb = doc.call(&b, "GET", "/vm.memory-hash", None, 200);
    assert!(hb["memory_hash"].is_string());
    let stopped = doc.call(&b, "PUT", "/vm.shutdown", None, 200);
    assert_eq!(stopped, json!({"stopped": true}));
    let out = dst.wait_output(PATIENCE);
    assert_eq!(
        common::last_json(&out)["outcome"],
        "stopped",
        "{}",
        text(&out.stderr)
    );
}

/// Connects and sends half a request.
fn stall(api: &Path) -> UnixStream {
    let mut s = UnixStream::connect(api).unwrap();
    s.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHost: loc")
        .unwrap();
    s
}

/// Reads what the server says to a stalled client (it closes after answering).
fn answer_to(mut s: UnixStream) -> HttpReply {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = Vec::new();
    s.read_to_end(&mut b).unwrap();
    parse_reply(&b)
}

#[test]
fn a_stalled_client_holds_up_nobody_and_connections_are_bounded() {
    let doc = Doc::load();
    let dir = TempDir::new("api-stall");
    let a = dir.path("a.sock");
    let _vm = vm(&a);
    let stalled = stall(&a);
    // A client that trickles its head a byte at a time: the time bound is for the whole
    // request, not for each read, so it is cut off too.
    let mut trickle = stall(&a);
    let mut trickler = trickle.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            if trickler.write_all(b"x").is_err() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        false
    });
    // Others are served while they wait.
    for _ in 0..3 {
        assert_eq!(
            doc.call(&a, "GET", "/vm.info", None, 200)["state"],
            "running"
        );
    }
    doc.call(&a, "GET", "/vmm.ping", None, 200);
    // It is cut off with 408 when its time is up.
    let r = answer_to(stalled);
    doc.check("GET", "/vm.info", &r);
    assert_eq!(r.status, 408);
    trickle.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut b = Vec::new();
    // The server drops the rest it is sent after answering; reading may end in a reset.
    let _ = trickle.read_to_end(&mut b);
    assert_eq!(parse_reply(&b).status, 408);
    assert!(writer.join().unwrap(), "the trickling client was cut off");

    // 16 stalled connections take every slot: the next one is refused at once with 503...
    let all: Vec<UnixStream> = (0..16).map(|_| stall(&a)).collect();
    let r = http(&a, "GET", "/vm.info", None);
    doc.check("GET", "/vm.info", &r);
    assert_eq!(r.status, 503, "{:?}", text(&r.body));
    assert!(r.header("retry-after").is_some());
    // ...and served again once they timed out.
    for s in all {
        assert_eq!(answer_to(s).status, 408);
    }
    common::wait_until("a slot is free again", PATIENCE, || {
        http(&a, "GET", "/vm.info", None).status == 200
    });
    doc.call(&a, "PUT", "/vm.shutdown", None, 200);
}
