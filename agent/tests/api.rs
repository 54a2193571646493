//! The HTTP API in process, on a loopback port, without podman: authentication before the
//! body, the body limit, connection timeouts, and `/healthz` as the reconciler's liveness.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use archy_agent::api::{self, Api, BODY_TIMEOUT, HEADER_TIMEOUT, MAX_BODY};
use archy_agent::exec::{Exec, ExecConfig};
use archy_agent::metrics::Metrics;
use archy_agent::reconcile::Shared;
use archy_agent::runtime::BackendKind;
use archy_agent::store::Store;

struct Server {
    port: u16,
    api: Arc<Api>,
    token: String,
    _dir: tempfile::TempDir,
}

/// An API on a free port, served by its own thread until the test process ends. The agent
/// started `age` ago and ticks every `interval`; podman is `podman` (a script, or nothing).
fn server(interval: Duration, age: Duration, podman: &std::path::Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new("podman"));
    let exec = Arc::new(Exec::new(
        ExecConfig {
            podman: podman.into(),
            podman_args: vec![],
            systemctl: "/nonexistent/systemctl".into(),
            podman_cgroup: None,
            timeout: Duration::from_secs(30),
        },
        metrics.clone(),
    ));
    let (store, _) = Store::open(dir.path()).unwrap();
    let started = Instant::now().checked_sub(age).unwrap();
    let token_digest = api::ensure_token(&dir.path().join("agent")).unwrap();
    let token = std::fs::read_to_string(dir.path().join("agent").join(api::TOKEN_FILE)).unwrap();
    let (wake, _) = mpsc::channel();
    let api = Arc::new(Api {
        shared: Arc::new(Shared::new(store, metrics, started)),
        wake: Mutex::new(wake),
        catalog_dir: dir.path().join("apps"),
        backend: BackendKind::Podman,
        token_digest,
        instance: "test".into(),
        tick_interval: interval,
        exec,
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = api.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            api::serve(listener, served, std::future::pending::<()>()).await
        })
    });
    Server { port, api, token, _dir: dir }
}

fn default_server() -> Server {
    server(Duration::from_secs(2), Duration::ZERO, std::path::Path::new("/nonexistent/podman"))
}

/// Sends `head` then `body` on a fresh connection (the server may stop reading: write errors
/// are ignored) and returns what came back before the server closed, or `wait` passed.
fn exchange(port: u16, head: &str, body: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn post_head(auth: Option<&str>, length: usize) -> String {
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    format!("POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {length}\r\nConnection: close\r\n\r\n")
}

#[test]
fn an_unauthenticated_request_with_a_huge_body_is_refused_401_without_reading_it() {
    let srv = default_server();
    let start = Instant::now();
    // A gigabyte announced, a little sent: the answer may not wait for the rest.
    let answer = exchange(srv.port, &post_head(None, 1 << 30), &[b' '; 4096], Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("bearer token"), "{answer}");
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
}

#[test]
fn an_authenticated_body_over_64_kib_is_refused_413() {
    let srv = default_server();
    let auth = format!("Bearer {}", srv.token);
    let body = vec![b' '; 100 * 1024];
    let limit = MAX_BODY.to_string();
    // Declared too long: refused on the header.
    let answer = exchange(srv.port, &post_head(Some(&auth), body.len()), &body, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(&limit), "the answer names the limit: {answer}");
    // Chunked, no length declared: refused once the limit is read.
    let head = format!(
        "POST /rpc HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let mut chunked = Vec::new();
    for piece in body.chunks(8192) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(srv.port, &head, &chunked, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(&limit), "{answer}");
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let srv = default_server();
    let body = r#"{"jsonrpc": "2.0", "id": 1, "method": "node.status"}"#;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {}", srv.token);
        let answer =
            exchange(srv.port, &post_head(Some(&auth), body.len()), body.as_bytes(), Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 200"), "{scheme}: {answer}");
        assert!(answer.contains("\"result\""), "{scheme}: {answer}");
    }
    for auth in [format!("Basic {}", srv.token), format!("Bearer{}", srv.token), "bearer wrong".into()] {
        let answer =
            exchange(srv.port, &post_head(Some(&auth), body.len()), body.as_bytes(), Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 401"), "{auth}: {answer}");
    }
}

/// A connection that sends nothing, one that trickles its headers and one that stops in
/// its body are each closed by the server within its timeouts.
#[test]
fn slowloris_connections_are_closed_by_the_server_within_the_timeouts() {
    let srv = default_server();
    let port = srv.port;
    let bound = HEADER_TIMEOUT.max(BODY_TIMEOUT) + Duration::from_secs(5);
    let silent = std::thread::spawn(move || {
        let start = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(bound)).unwrap();
        let read = s.read(&mut [0u8; 64]);
        let reset = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionReset;
        (matches!(read, Ok(0)) || read.as_ref().is_err_and(reset), start.elapsed())
    });
    let trickle = std::thread::spawn(move || {
        let start = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let _ = s.write_all(b"POST /rpc HTTP/1.1\r\nHost: x\r\n");
        // One byte of a header every half second, never its end.
        while start.elapsed() < bound {
            if s.write_all(b"X").is_err() {
                break;
            }
            match s.read(&mut [0u8; 64]) {
                Ok(_) => break, // closed (0) or answered: either way no longer held
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        start.elapsed()
    });
    let stalled_body = std::thread::spawn({
        let auth = format!("Bearer {}", srv.token);
        move || {
            let start = Instant::now();
            let answer = exchange(port, &post_head(Some(&auth), 100), b"{\"jsonrpc\"", bound);
            (answer, start.elapsed())
        }
    });
    let (closed, took) = silent.join().unwrap();
    assert!(closed, "a silent connection was held {took:?}");
    assert!(took >= HEADER_TIMEOUT - Duration::from_secs(1), "closed too early: {took:?}");
    let took = trickle.join().unwrap();
    assert!(took < bound, "a trickling connection was held {took:?}");
    let (answer, took) = stalled_body.join().unwrap();
    assert!(took < bound, "a stalled body was waited for {took:?}: {answer}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

fn healthz(port: u16) -> String {
    exchange(
        port,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
        Duration::from_secs(5),
    )
}

#[test]
fn healthz_fails_when_no_tick_completed_for_three_tick_intervals() {
    let interval = Duration::from_millis(200);
    let dir = tempfile::tempdir().unwrap();
    // A podman that takes 2 s: a tick busy in it is alive, though no tick completes.
    let podman = dir.path().join("podman");
    std::fs::write(&podman, "#!/bin/sh\nsleep 2\n").unwrap();
    std::fs::set_permissions(&podman, std::fs::Permissions::from_mode(0o755)).unwrap();
    let srv = server(interval, Duration::from_secs(60), &podman);
    std::thread::sleep(interval * 4); // the executor idle, as since the start
    let answer = healthz(srv.port);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("since the agent started"), "{answer}");
    assert!(answer.contains("no tick completed for 60."), "says how long: {answer}");

    srv.api.shared.status.lock().unwrap().last_tick_at = Some(SystemTime::now());
    assert!(healthz(srv.port).starts_with("HTTP/1.1 200"), "a tick just completed");
    std::thread::sleep(interval * 4);
    let answer = healthz(srv.port);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("since the last one"), "{answer}");

    let exec = srv.api.exec.clone();
    let call = std::thread::spawn(move || exec.podman(&["stop", "-t", "600", "x"]));
    std::thread::sleep(interval * 4);
    let answer = healthz(srv.port);
    assert!(answer.starts_with("HTTP/1.1 200"), "a tick inside a slow podman call is alive: {answer}");
    call.join().unwrap().unwrap();
}

/// start/stop/restart/uninstall of an app that is not installed (never, or uninstalled and
/// not yet forgotten by a tick) answer NOT_INSTALLED, checked in the store update itself.
#[test]
fn requests_on_an_app_not_installed_answer_not_installed() {
    use archy_agent::store::{AppState, Desired};
    let srv = default_server();
    let auth = format!("Bearer {}", srv.token);
    srv.api
        .shared
        .store
        .lock()
        .unwrap()
        .update(|s| s.apps.insert("gone".into(), AppState::new(Desired::Absent)))
        .unwrap();
    for method in ["package.start", "package.stop", "package.restart", "package.uninstall"] {
        for app in ["gone", "never"] {
            let body = format!(
                r#"{{"jsonrpc": "2.0", "id": 1, "method": "{method}", "params": {{"id": "{app}"}}}}"#
            );
            let answer = exchange(
                srv.port,
                &post_head(Some(&auth), body.len()),
                body.as_bytes(),
                Duration::from_secs(5),
            );
            assert!(answer.starts_with("HTTP/1.1 200"), "{method} {app}: {answer}");
            assert!(answer.contains(&api::code::NOT_INSTALLED.to_string()), "{method} {app}: {answer}");
        }
    }
}
