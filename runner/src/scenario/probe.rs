//! The scorecard's checks of one app from inside the node, as a client there would see it:
//! its container, its state by the agent and by podman, its own API asked with the secret
//! the agent generated, and its UI URLs. An app that declares no API or UI is `n/a`.

use anyhow::{bail, ensure, Context, Result};
use archy_agent::manifest::{Manifest, RpcAuth, SecretKind, BCRYPT_PLAINTEXT_SUFFIX};
use archy_agent::runtime::{ContainerState, Health};
use archy_agent::store::Desired;
use serde_json::json;

use super::checker;
use crate::agent_client::AgentClient;
use crate::evidence::Evidence;
use crate::node::Node;

/// An HTTP request from inside the node with bash alone (no curl or wget on every host).
/// The secret file is read by the script itself: a secret never rides on a command line,
/// where every local user (and the runner's printed commands) would see it.
const HTTP: &str = r#"port=$1 path=$2 body=$3 user=$4 secret=$5
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 7
{
  if [ -n "$body" ]; then printf 'POST %s HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n' "$path" "${#body}"
  else printf 'GET %s HTTP/1.0\r\n' "$path"; fi
  printf 'Host: 127.0.0.1\r\nConnection: close\r\n'
  if [ -n "$secret" ]; then printf 'Authorization: Basic %s\r\n' "$({ printf '%s:' "$user"; cat "$secret"; } | base64 -w0)"; fi
  printf '\r\n%s' "$body"
} >&3
cat <&3"#;

/// An answer: the status code, where a redirect points, and the body.
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// `GET` (or `POST body`) `http://127.0.0.1:<port><path>` inside the node, with basic
/// authentication from `(user, secret file under the node's root)`.
pub fn http(
    node: &dyn Node,
    port: u16,
    path: &str,
    body: &str,
    auth: Option<(&str, &str)>,
) -> Result<Answer> {
    let (user, secret) = match auth {
        Some((user, rel)) => (user.to_string(), node.root_on_node().join(rel).display().to_string()),
        None => (String::new(), String::new()),
    };
    let port = port.to_string();
    let out = node.exec(&["timeout", "10", "bash", "-c", HTTP, "http", &port, path, body, &user, &secret])?;
    let url = format!("http://127.0.0.1:{port}{path}");
    ensure!(
        out.status.success(),
        "{url}: no answer ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse(&out.stdout).with_context(|| format!("{url}: not an HTTP answer"))
}

fn parse(raw: &[u8]) -> Result<Answer> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status code")?;
    let location = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location").then(|| v.trim().to_string())
    });
    Ok(Answer { status, location, body: raw[split + 4..].to_vec() })
}

/// The evidence key of a check the app's manifest gives nothing to (no API, no UI).
pub const NOT_APPLICABLE: &str = "n/a";

fn not_applicable(what: &str) -> Evidence {
    Evidence::default().with(NOT_APPLICABLE, format!("the manifest declares no {what}"))
}

/// Podman has one container of the app.
pub fn container_present(node: &dyn Node, app: &str) -> Result<Evidence> {
    let mine: Vec<_> = checker::containers(node)?.into_iter().filter(|c| c.app == app).collect();
    ensure!(mine.len() == 1, "{app}: podman has {} containers of it, want one", mine.len());
    Ok(Evidence::default().with("container", &mine[0].name))
}

/// The agent says the app runs, healthy, and podman agrees.
pub fn valid_state(node: &dyn Node, agent: &AgentClient, m: &Manifest) -> Result<Evidence> {
    let app = &m.id;
    let s =
        agent.list()?.into_iter().find(|a| &a.id == app).with_context(|| format!("{app}: not installed"))?;
    let healthy = |h: Option<Health>| match m.health {
        Some(_) => h == Some(Health::Healthy),
        None => true,
    };
    ensure!(
        s.desired == Desired::Running
            && s.state == Some(ContainerState::Running)
            && healthy(s.health)
            && s.up,
        "{app}: the agent says desired {:?}, state {:?}, health {:?}, up {}",
        s.desired,
        s.state,
        s.health,
        s.up
    );
    let c = checker::containers(node)?.into_iter().find(|c| &c.app == app);
    let agrees =
        c.as_ref().is_some_and(|c| c.running && c.health.as_deref() == m.health.as_ref().map(|_| "healthy"));
    ensure!(agrees, "{app}: the agent says running and healthy, podman says {c:?}");
    Ok(Evidence::default()
        .with("agent", json!({"state": s.state, "health": s.health}))
        .with("podman", c.map(|c| c.health)))
}

/// Every UI URL of the manifest answers 200 with a body.
pub fn ui(node: &dyn Node, m: &Manifest) -> Result<Evidence> {
    if m.ui.is_empty() {
        return Ok(not_applicable("UI"));
    }
    let mut answered = Vec::new();
    for u in &m.ui {
        // A web app sends `/` to its login or setup page, as a browser would follow.
        let mut path = u.path.clone();
        let mut a = http(node, u.port, &path, "", None)?;
        for _ in 0..5 {
            match (&a.location, a.status) {
                (Some(to), 301 | 302 | 303 | 307 | 308) => {
                    let to = to.strip_prefix(&format!("http://127.0.0.1:{}", u.port)).unwrap_or(to);
                    ensure!(to.starts_with('/'), "{}: {path} redirects off the app, to {to}", m.id);
                    path = to.to_string();
                    a = http(node, u.port, &path, "", None)?;
                }
                _ => break,
            }
        }
        let url = format!("http://127.0.0.1:{}{path}", u.port);
        ensure!(
            a.status == 200 && !a.body.is_empty(),
            "{}: {url} answered {} with {} bytes",
            m.id,
            a.status,
            a.body.len()
        );
        answered.push(json!({"url": url, "bytes": a.body.len()}));
    }
    Ok(Evidence::default().with("answered", answered))
}

/// The app's API answers a request authenticated with the secret the agent generated (and
/// refuses one without it), or, for an app given only a bcrypt hash, serves a hash that the
/// generated password verifies against.
pub fn rpc(node: &dyn Node, m: &Manifest) -> Result<Evidence> {
    let Some(r) = &m.rpc else { return Ok(not_applicable("RPC")) };
    let app = &m.id;
    let url = format!("http://127.0.0.1:{}{}", r.port, r.path);
    let body = r.body.as_deref().unwrap_or_default();
    match r.auth {
        RpcAuth::Basic => {
            let owner = m.secret_files.iter().find(|s| s.name == r.secret).map_or(app.as_str(), |s| &s.app);
            let secret = format!("data/secrets/{owner}/{}", r.secret);
            let user = r.user.as_deref().unwrap_or_default();
            let anonymous = http(node, r.port, &r.path, body, None)?.status;
            ensure!(
                matches!(anonymous, 401 | 403),
                "{app}: {url} answered {anonymous} without credentials: it must refuse them"
            );
            let a = http(node, r.port, &r.path, body, Some((user, &secret)))?;
            ensure!(
                a.status == 200 && !a.body.is_empty(),
                "{app}: {url} answered {} ({} bytes) to {user} with the secret {}",
                a.status,
                a.body.len(),
                r.secret
            );
            Ok(Evidence::default()
                .with("url", url)
                .with("without_credentials", anonymous)
                .with("with_secret", a.status))
        }
        RpcAuth::BcryptHash => {
            let a = http(node, r.port, &r.path, body, None)?;
            ensure!(a.status == 200, "{app}: {url} answered {}", a.status);
            let pw_file = format!("data/secrets/{app}/{}{BCRYPT_PLAINTEXT_SUFFIX}", r.secret);
            let pw = node.read(&pw_file)?.with_context(|| format!("{app}: {pw_file} is missing"))?;
            let hash = a.body.trim_ascii();
            if let Some(why) = archy_agent::secrets::problem(SecretKind::Bcrypt, hash, Some(&pw)) {
                bail!(
                    "{app}: the hash {url} serves does not check out against the generated password: {}",
                    why.as_str()
                );
            }
            Ok(Evidence::default().with("url", url).with("hash_verifies", true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_its_status_and_body() {
        let a = parse(b"HTTP/1.0 401 Unauthorized\r\nContent-Length: 3\r\n\r\nno\n").unwrap();
        assert_eq!((a.status, a.body.as_slice(), a.location), (401, b"no\n".as_slice(), None));
        let a = parse(b"HTTP/1.1 302 Found\r\nlocation: /login?r=%2F\r\n\r\n").unwrap();
        assert_eq!((a.status, a.location.as_deref()), (302, Some("/login?r=%2F")));
        assert!(parse(b"garbage").is_err());
        assert!(parse(b"HTTP/1.0 x\r\n\r\n").is_err());
    }
}
