//! Manifest parsing and validation rules, and the parser's robustness on arbitrary input.

mod support;

use std::path::Path;

use archy_agent::manifest::{check_image, is_bare_name, Catalog, Manifest};
use proptest::prelude::*;
use support::*;

fn parse(text: &str) -> Result<Manifest, String> {
    Manifest::parse(Path::new("t/manifest.yml"), text).map_err(|e| e.to_string())
}

const MINIMAL: &str = "id: t\nname: T\nversion: '1'\nimage: localhost/t:1\n";

#[test]
fn minimal_manifest_gets_safe_defaults() {
    let m = parse(MINIMAL).unwrap();
    assert!(m.ports.is_empty() && m.capabilities.is_empty() && m.health.is_none() && !m.fixture);
    assert_eq!(m.restart.as_str(), "on-failure");
    assert_eq!(m.stop_timeout.0.as_secs(), 10);
    let m = parse(&format!("{MINIMAL}ports: [{{host: 18000, container: 8000}}]\n")).unwrap();
    assert_eq!(m.ports[0].bind.to_string(), "127.0.0.1", "ports bind to loopback unless told otherwise");
}

#[test]
fn there_is_no_way_to_ask_for_privilege() {
    for field in ["privileged: true", "user: root", "cap_add: [SYS_ADMIN]", "security_opt: [label=disable]"] {
        let err = parse(&format!("{MINIMAL}{field}\n")).unwrap_err();
        assert!(err.contains("unknown field"), "{field}: {err}");
    }
    let err = parse(&format!("{MINIMAL}capabilities: [ALL]\n")).unwrap_err();
    assert!(err.contains("`ALL` is not a capability name"), "{err}");
}

#[test]
fn restart_no_is_the_string_no() {
    // YAML 1.1 would read `no` as false; the manifest means systemd's `Restart=no`.
    assert_eq!(parse(&format!("{MINIMAL}restart: no\n")).unwrap().restart.as_str(), "no");
}

#[test]
fn durations() {
    let m = parse(&format!("{MINIMAL}stop_timeout: 5m\n")).unwrap();
    assert_eq!(m.stop_timeout.0.as_secs(), 300);
    for bad in ["5", "five", "-1s", "1.5s", "s", "10d"] {
        let err = parse(&format!("{MINIMAL}stop_timeout: {bad}\n")).unwrap_err();
        assert!(err.contains("stop_timeout: ") && err.contains("at line 5"), "{bad}: {err}");
    }
}

#[test]
fn bare_names_reject_every_trick() {
    for ok in ["rpc-password", "fmcd-password", "a", "x.y_z-1", "A1"] {
        assert!(is_bare_name(ok), "{ok}");
    }
    for bad in [
        "",
        "/etc/passwd",
        "a/b",
        "..",
        "a..b",
        ".hidden",
        "-flag",
        "a\0b",
        "a\nb",
        "a b",
        "a\\b",
        "a\u{2215}b",
        "a\u{ff0f}b",
        "\u{2024}\u{2024}",
        "é",
        "a:b",
        &"x".repeat(65),
    ] {
        assert!(!is_bare_name(bad), "{bad:?} must be rejected");
    }
}

#[test]
fn image_references() {
    for ok in [
        "docker.io/lightninglabs/lnd:v0.20.1-beta",
        "localhost/archy-fixture:1",
        "localhost:5000/a/b:1.0",
        "ghcr.io/x/y@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "quay.io/a/b_c__d:tag_1",
        "localhost/a---b.c:1",
    ] {
        assert_eq!(check_image(ok), Ok(()), "{ok}");
    }
    for (bad, why) in [
        ("lnd:v1", "not fully qualified"),
        ("docker.io/lightninglabs/lnd", "no tag or digest"),
        ("docker.io/Upper/lnd:1", "path component `Upper`"),
        ("docker.io/a/b:", "tag ``"),
        ("docker.io/a/b:-x", "tag `-x`"),
        ("docker.io/a/b@sha256:abc", "64 lowercase hex"),
        ("docker.io/a/b@md5:abc", "sha256"),
        ("docker.io//b:1", "path component ``"),
        ("docker..io/a:1", "registry"),
        ("docker.io:99999/a:1", "registry"),
        ("localhost:0/a:1", "registry"),
        ("localhost/a._b:1", "path component `a._b`"),
        ("localhost/a-_b:1", "path component `a-_b`"),
        ("localhost/a___b:1", "path component `a___b`"),
        ("", "no tag or digest"),
    ] {
        let err = check_image(bad).unwrap_err();
        assert!(err.contains(why), "{bad:?}: {err}");
    }
}

#[test]
fn every_problem_of_a_manifest_is_reported_at_once() {
    let text = "id: Bad_Id\nname: ''\nversion: '1'\nimage: nope\ncapabilities: [cap_net_raw]\n\
                generated_secrets: [{target: ../x, kind: hex16}]\nports: [{host: 80}]\n";
    let err = parse(text).unwrap_err();
    for want in [
        "id:",
        "name:",
        "image:",
        "capabilities[0]",
        "generated_secrets[0].target",
        "ports[0].container",
        "ports[0].host",
    ] {
        assert!(err.contains(&format!("t/manifest.yml: {want}")), "missing {want} in:\n{err}");
    }
}

#[test]
fn every_catalog_manifest_parses_on_its_own() {
    let apps = repo_root().join("apps");
    for entry in std::fs::read_dir(&apps).unwrap() {
        let path = entry.unwrap().path().join("manifest.yml");
        Manifest::load(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The platform once shipped a stale `:latest` of a companion UI built on its nodes. Every
/// image the catalog builds is tagged with its app's version (a new version, a new tag), is
/// built FROM the image every node imports (nodes have no registry), and serves each of its
/// `ui` paths from a non-empty file of its build context (copied to /www; `/` is index.html).
#[test]
fn every_image_built_on_the_node_is_pinned_offline_and_serves_its_ui_paths() {
    let catalog = Catalog::load(&repo_root().join("apps")).unwrap();
    let built: Vec<&Manifest> = catalog.apps.values().filter(|m| m.build.is_some()).collect();
    assert!(built.len() >= 4, "fx-ui and the three companion UIs: {}", built.len());
    for m in built {
        let dir = repo_root().join("apps").join(&m.id);
        let pinned = m.image.starts_with("localhost/") && m.image.ends_with(&format!(":{}", m.version));
        assert!(pinned, "{}: {} is not localhost/NAME:<version {}>", m.id, m.image, m.version);
        let containerfile =
            std::fs::read_to_string(dir.join(&m.build.as_ref().unwrap().containerfile)).unwrap();
        assert_eq!(containerfile.lines().next(), Some("FROM localhost/archy-fixture:1"), "{}", m.id);
        for u in &m.ui {
            let file = match u.path.trim_start_matches('/') {
                "" => "index.html",
                f => f,
            };
            let len = std::fs::metadata(dir.join(file)).map(|f| f.len()).unwrap_or(0);
            assert!(len > 0, "{}: ui path {} has no non-empty {file} beside the manifest", m.id, u.path);
            assert!(
                containerfile.contains(file) || containerfile.contains("COPY . "),
                "{}: {file} not copied",
                m.id
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn parser_never_panics_on_manifest_shaped_input(
        key in prop::sample::select(vec!["id", "image", "ports", "volumes", "environment", "secret_files",
            "generated_secrets", "capabilities", "health", "depends_on", "memory", "restart", "stop_timeout",
            "network", "build", "command"]),
        value in "[ -~\\n]{0,40}",
        image in "[a-zA-Z0-9./:@_-]{0,60}",
    ) {
        let text = format!("id: t\nname: T\nversion: '1'\nimage: '{}'\n{key}: {value}\n", image.replace('\'', ""));
        let _ = parse(&text);
        let _ = check_image(&image);
    }
}

/// Regression: `depends_on` entries were only compared with other ids, never checked as ids,
/// and each is rendered into the unit as `Requires=<id>.service`.
#[test]
fn a_dependency_with_a_line_break_cannot_add_a_key_to_the_unit() {
    let err =
        parse(&format!("{MINIMAL}depends_on: [\"fx-web\\nExecStartPre=/bin/sh -c id\"]\n")).unwrap_err();
    assert!(
        err.contains(r"depends_on[0]: `fx-web\nExecStartPre=/bin/sh -c id` is not a valid app id"),
        "{err}"
    );
    for bad in ["Fx-Web", "fx_web", "fx-web-", "", "fx web"] {
        let err = parse(&format!("{MINIMAL}depends_on: [{bad:?}]\n")).unwrap_err();
        assert!(err.contains("depends_on[0]") && err.contains("is not a valid app id"), "{bad:?}: {err}");
    }
}

/// Regression: a catalog directory was loaded whatever its name, and a name with a line
/// break reached the problem list (and the terminal) raw.
#[test]
fn a_catalog_directory_that_is_not_an_app_id_is_a_problem_of_the_catalog() {
    use std::os::unix::ffi::OsStrExt;
    let catalog = tempfile::tempdir().unwrap();
    let web = std::fs::read_to_string(repo_root().join("apps/fx-web/manifest.yml")).unwrap();
    let names = [
        std::ffi::OsStr::new("fx-web"),
        std::ffi::OsStr::new("Fx_Web"),
        std::ffi::OsStr::new("fx\nweb"),
        std::ffi::OsStr::from_bytes(b"fx\xffweb"),
        std::ffi::OsStr::new(".git"),
    ];
    for name in names {
        std::fs::create_dir(catalog.path().join(name)).unwrap();
        std::fs::write(catalog.path().join(name).join("manifest.yml"), &web).unwrap();
    }
    let (loaded, problems) = Catalog::load_lenient(catalog.path());
    assert_eq!(loaded.apps.keys().collect::<Vec<_>>(), ["fx-web"], "the valid app still loads");
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 3, "{text:#?}");
    for (p, shown) in problems.iter().zip([r"`Fx_Web`", r"`fx\nweb`", r"`fx\u{fffd}web`"]) {
        assert_eq!(p.file, catalog.path(), "a problem of the catalog, not of a file in it");
        let line = p.to_string();
        assert!(line.contains(&format!("directory {shown} is not a valid app id")), "{line}");
        assert!(!line.contains('\n'), "the name is shown escaped: {line:?}");
    }
}

/// Regression: bitcoin-knots passed `-rpcpassword="$BITCOIN_RPC_PASSWORD"` and lnd
/// `--bitcoind.rpcpass="$(cat /run/secrets/rpc-password)"`: the value was on a command
/// line, readable by every local user in `ps`.
#[test]
fn a_command_that_puts_a_secret_on_a_command_line_is_rejected() {
    let secrets = "environment:\n  TOKEN: { secret: token }\n  PLAIN: text\n\
                   generated_secrets: [{ target: token, kind: hex32 }]\n";
    let command = |arg: &str| format!("{MINIMAL}{secrets}command: [sh, -c, {arg:?}]\n");
    let health =
        |cmd: &str| format!("{MINIMAL}{secrets}health: {{ command: {:?} }}\n", format!("{cmd}; true"));
    for (arg, what) in [
        ("exec app --token=$TOKEN", "`$TOKEN`, which is read from a secret"),
        ("exec app --token=\"${TOKEN}\"", "`$TOKEN`"),
        ("exec app --token=${TOKEN:-none}", "`$TOKEN`"),
        ("exec app ${#TOKEN}", "`$TOKEN`"),
        ("exec app --token=\"$(cat /run/secrets/token)\"", "a command substitution reading a secret"),
        ("exec app --token=$(< /run/secrets/token)", "a command substitution reading a secret"),
        ("exec app --token=`cat /run/secrets/token`", "a command substitution reading a secret"),
        ("exec app --token=$( (cat /run/secrets/token) )", "a command substitution reading a secret"),
    ] {
        let err = parse(&command(arg)).unwrap_err();
        assert!(err.contains(&format!("command[2]: expands {what}")), "{arg}: {err}");
        assert!(err.contains("readable by every local user"), "{arg}: {err}");
        let err = parse(&health(arg)).unwrap_err();
        assert!(err.contains(&format!("health.command: expands {what}")), "{arg}: {err}");
    }
    // Reading the file, or a variable that holds no secret, puts nothing on a command line.
    for ok in [
        "umask 077 && { printf 'password='; cat /run/secrets/token; } > /dev/shm/app.conf && exec app",
        "exec app --token-file=/run/secrets/token --greeting=\"$PLAIN\" $TOKENS $$ $1",
        "$(date) cat /run/secrets/token",
        "env | grep -q '^TOKEN=[$]2'",
    ] {
        parse(&command(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        parse(&health(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn unquoted_unit_values_keep_their_spaces_or_are_rejected() {
    // systemd and Quadlet strip the spaces around a value they do not read quoted.
    for (field, yaml) in [
        ("name", "name: ' T'\n"),
        ("volumes[0].path", "volumes: [{ name: d, path: '/data ' }]\n"),
        ("health.command", "health: { command: 'true ' }\n"),
    ] {
        let text = format!("{MINIMAL}{yaml}").replacen("name: T\n", "", usize::from(field == "name"));
        let err = parse(&text).unwrap_err();
        assert!(err.contains(&format!("{field}: ")) && err.contains("surrounding spaces"), "{field}: {err}");
    }
}
