//! The generated-secrets core: generation, idempotence, each self-healing case, the lock,
//! completeness and the environment file. Ownership by the real service user is tested in
//! `secrets_service_user.rs`.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use archy_agent::manifest::{Catalog, Manifest};
use archy_agent::secrets::{self, Ensured, HealReason, Outcome};
use support::*;

fn catalog() -> Catalog {
    Catalog::load(&repo_root().join("apps")).unwrap()
}

fn app(id: &str) -> Manifest {
    catalog().get(id).unwrap().clone()
}

fn outcomes(e: &[Ensured]) -> Vec<(&str, Outcome)> {
    e.iter().map(|e| (e.target.as_str(), e.outcome)).collect()
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn generates_every_kind_with_mode_0600_in_a_0700_dir() {
    let root = tempfile::tempdir().unwrap();
    let gw = app("fx-gateway");
    let web = app("fx-web");
    let client = app("fx-client");
    assert_eq!(outcomes(&secrets::ensure(root.path(), &gw).unwrap()), [("gateway-hash", Outcome::Generated)]);
    assert_eq!(outcomes(&secrets::ensure(root.path(), &web).unwrap()), [("api-token", Outcome::Generated)]);
    assert_eq!(
        outcomes(&secrets::ensure(root.path(), &client).unwrap()),
        [("client-id", Outcome::Generated)]
    );

    let token = read(&root.path().join("fx-web/api-token"));
    assert_eq!(token.len(), 64, "hex32 is 64 hex digits");
    assert!(token.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(read(&root.path().join("fx-client/client-id")).len(), 32, "hex16 is 32 hex digits");
    let pw = read(&root.path().join("fx-gateway/gateway-hash.pw"));
    let hash = read(&root.path().join("fx-gateway/gateway-hash"));
    assert!(bcrypt::verify(&pw, &hash).unwrap(), "the hash must verify against its password");
    assert!(hash.starts_with("$2"), "{hash}");

    for f in
        ["fx-web/api-token", "fx-client/client-id", "fx-gateway/gateway-hash", "fx-gateway/gateway-hash.pw"]
    {
        assert_eq!(mode(&root.path().join(f)), 0o600, "{f}");
    }
    for d in ["", "fx-web", "fx-gateway"] {
        assert_eq!(mode(&root.path().join(d)), 0o700, "dir {d:?}");
    }
    let leftovers: Vec<_> = fs::read_dir(root.path().join("fx-web"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left behind: {leftovers:?}");
}

#[test]
fn a_valid_secret_is_never_rewritten() {
    let root = tempfile::tempdir().unwrap();
    let gw = app("fx-gateway");
    secrets::ensure(root.path(), &gw).unwrap();
    let files = ["gateway-hash", "gateway-hash.pw"].map(|f| root.path().join("fx-gateway").join(f));
    let before: Vec<_> = files.iter().map(|p| (fs::metadata(p).unwrap(), fs::read(p).unwrap())).collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(outcomes(&secrets::ensure(root.path(), &gw).unwrap()), [("gateway-hash", Outcome::Kept)]);
    for (p, (meta, bytes)) in files.iter().zip(before) {
        let now = fs::metadata(p).unwrap();
        assert_eq!(now.ino(), meta.ino(), "{} was replaced", p.display());
        assert_eq!(now.mtime_nsec(), meta.mtime_nsec(), "{} was touched", p.display());
        assert_eq!(now.mtime(), meta.mtime(), "{} was touched", p.display());
        assert_eq!(fs::read(p).unwrap(), bytes, "{} changed", p.display());
    }
}

/// Damages one file, ensures again, and checks the reason reported and the result.
fn heal_case(id: &str, file: &str, damage: impl FnOnce(&Path), want: HealReason) -> (String, String) {
    let root = tempfile::tempdir().unwrap();
    let m = app(id);
    secrets::ensure(root.path(), &m).unwrap();
    let path = root.path().join(id).join(file);
    let old = fs::read_to_string(&path).unwrap();
    damage(&path);
    let target = &m.generated_secrets[0].target;
    assert_eq!(
        outcomes(&secrets::ensure(root.path(), &m).unwrap()),
        [(target.as_str(), Outcome::Healed(want))],
        "damage to {file} should be healed as {want:?}"
    );
    for g in &m.generated_secrets {
        assert_eq!(
            secrets::inspect(&root.path().join(id), g).unwrap(),
            None,
            "{file} still broken after heal"
        );
    }
    assert_eq!(mode(&path), 0o600);
    assert_eq!(outcomes(&secrets::ensure(root.path(), &m).unwrap()), [(target.as_str(), Outcome::Kept)]);
    (old, fs::read_to_string(&path).unwrap())
}

#[test]
fn heals_a_missing_secret() {
    heal_case("fx-web", "api-token", |p| fs::remove_file(p).unwrap(), HealReason::Missing);
}

#[test]
fn heals_an_empty_secret() {
    heal_case("fx-web", "api-token", |p| fs::write(p, "").unwrap(), HealReason::Empty);
}

#[test]
fn heals_a_secret_of_the_wrong_length() {
    heal_case("fx-web", "api-token", |p| fs::write(p, "abcd").unwrap(), HealReason::Malformed);
}

#[test]
fn heals_a_secret_that_is_not_hex() {
    heal_case("fx-client", "client-id", |p| fs::write(p, "z".repeat(32)).unwrap(), HealReason::Malformed);
}

#[test]
fn heals_a_secret_replaced_by_a_symlink() {
    let (_, new) = heal_case(
        "fx-web",
        "api-token",
        |p| {
            fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink("/etc/hostname", p).unwrap();
        },
        HealReason::Malformed,
    );
    assert_eq!(new.len(), 64, "the link was replaced by a real secret, not followed");
}

#[test]
fn heals_a_secret_with_the_wrong_mode_and_rotates_it() {
    // A secret that was world-readable may have leaked: a fresh value, not a chmod.
    let (old, new) = heal_case(
        "fx-web",
        "api-token",
        |p| fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap(),
        HealReason::WrongMode,
    );
    assert_ne!(old, new);
}

#[test]
fn heals_a_secret_owned_by_another_user() {
    // As root here, "another user" is any other uid; secrets_service_user.rs covers the
    // real case of a root-owned file under the unprivileged service user.
    let (_, other, _) = service_user();
    let (old, new) = heal_case(
        "fx-web",
        "api-token",
        |p| nix::unistd::chown(p, Some(other.into()), None).unwrap(),
        HealReason::WrongOwner,
    );
    assert_ne!(old, new);
}

#[test]
fn heals_a_bcrypt_hash_that_does_not_match_and_keeps_the_password() {
    let root = tempfile::tempdir().unwrap();
    let m = app("fx-gateway");
    secrets::ensure(root.path(), &m).unwrap();
    let dir = root.path().join("fx-gateway");
    let pw = read(&dir.join("gateway-hash.pw"));
    fs::write(dir.join("gateway-hash"), bcrypt::hash("some other password", 4).unwrap()).unwrap();
    assert_eq!(
        outcomes(&secrets::ensure(root.path(), &m).unwrap()),
        [("gateway-hash", Outcome::Healed(HealReason::HashMismatch))]
    );
    assert_eq!(read(&dir.join("gateway-hash.pw")), pw, "a valid password is never rotated");
    assert!(bcrypt::verify(&pw, &read(&dir.join("gateway-hash"))).unwrap());
}

#[test]
fn heals_a_bcrypt_hash_that_is_garbage() {
    heal_case("fx-gateway", "gateway-hash", |p| fs::write(p, "not a hash").unwrap(), HealReason::Malformed);
}

#[test]
fn heals_a_lost_bcrypt_password_with_a_new_pair() {
    let (_, new_pw) =
        heal_case("fx-gateway", "gateway-hash.pw", |p| fs::remove_file(p).unwrap(), HealReason::Missing);
    assert_eq!(new_pw.len(), 32);
}

#[test]
fn stale_temp_files_from_a_killed_writer_are_removed() {
    let root = tempfile::tempdir().unwrap();
    let m = app("fx-web");
    secrets::ensure(root.path(), &m).unwrap();
    let stale = root.path().join("fx-web/.api-token.4242.deadbeef.tmp");
    fs::write(&stale, "half").unwrap();
    secrets::ensure(root.path(), &m).unwrap();
    assert!(!stale.exists());
}

#[test]
fn concurrent_ensures_generate_each_secret_once() {
    let root = tempfile::tempdir().unwrap();
    let m = app("fx-gateway");
    let results: Vec<Vec<Ensured>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| secrets::ensure(root.path(), &m).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let generated = results.iter().flatten().filter(|e| e.outcome == Outcome::Generated).count();
    let kept = results.iter().flatten().filter(|e| e.outcome == Outcome::Kept).count();
    assert_eq!((generated, kept), (1, 5), "{results:?}");
    let dir = root.path().join("fx-gateway");
    assert!(bcrypt::verify(read(&dir.join("gateway-hash.pw")), &read(&dir.join("gateway-hash"))).unwrap());
}

#[test]
fn completeness_names_each_unusable_reference() {
    let root = tempfile::tempdir().unwrap();
    let c = catalog();
    let client = c.get("fx-client").unwrap();
    let missing = secrets::check_complete(root.path(), client, &c).unwrap();
    assert_eq!(missing.len(), 1);
    assert_eq!(
        (missing[0].reference.to_string(), missing[0].reason),
        ("fx-web/api-token".into(), HealReason::Missing)
    );

    secrets::ensure(root.path(), c.get("fx-web").unwrap()).unwrap();
    assert!(secrets::check_complete(root.path(), client, &c).unwrap().is_empty());
    fs::write(root.path().join("fx-web/api-token"), "").unwrap();
    let empty = secrets::check_complete(root.path(), client, &c).unwrap();
    assert_eq!(empty[0].reason, HealReason::Empty);
}

#[test]
fn env_file_holds_secret_values_and_is_written_only_on_change() {
    let root = tempfile::tempdir().unwrap();
    let c = catalog();
    let client = c.get("fx-client").unwrap();
    secrets::ensure(root.path(), c.get("fx-web").unwrap()).unwrap();
    secrets::ensure(root.path(), client).unwrap();
    assert!(secrets::write_env_file(root.path(), client).unwrap());
    let env = root.path().join("fx-client/.env");
    let token = read(&root.path().join("fx-web/api-token"));
    assert_eq!(read(&env), format!("API_TOKEN={token}\n"), "only secret-sourced values go to the file");
    assert_eq!(mode(&env), 0o600);
    let ino = fs::metadata(&env).unwrap().ino();
    secrets::write_env_file(root.path(), client).unwrap();
    assert_eq!(fs::metadata(&env).unwrap().ino(), ino, "unchanged content must not be rewritten");
    // fx-web reads no secret through its environment: no file.
    assert!(!secrets::write_env_file(root.path(), c.get("fx-web").unwrap()).unwrap());
    assert!(!root.path().join("fx-web/.env").exists());
}

#[test]
fn a_secrets_dir_owned_by_someone_else_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let (_, other, _) = service_user();
    let dir = root.path().join("fx-web");
    fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(other.into()), None).unwrap();
    let err = secrets::ensure(root.path(), &app("fx-web")).unwrap_err().to_string();
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("chown it to the service user"),
        "{err}"
    );
}

#[test]
fn secret_values_never_reach_debug_output() {
    let root = tempfile::tempdir().unwrap();
    let e = secrets::ensure(root.path(), &app("fx-web")).unwrap();
    let value = read(&root.path().join("fx-web/api-token"));
    assert!(!format!("{e:?}").contains(&value));
}

/// Regression: "generated or healed" was decided by whether the app's directory existed
/// before the lock was taken, so a caller that found the directory made by a concurrent
/// caller reported a first generation as a heal (CI, concurrent_ensures_generate_each_secret_once).
#[test]
fn secrets_in_a_directory_another_caller_just_created_are_generated_not_healed() {
    let root = tempfile::tempdir().unwrap();
    let m = app("fx-gateway");
    fs::create_dir_all(root.path().join("fx-gateway")).unwrap();
    let first = secrets::ensure(root.path(), &m).unwrap();
    assert!(first.iter().all(|e| e.outcome == Outcome::Generated), "{first:?}");
    fs::remove_file(root.path().join("fx-gateway/gateway-hash.pw")).unwrap();
    let second = secrets::ensure(root.path(), &m).unwrap();
    assert_eq!(second[0].outcome, Outcome::Healed(HealReason::Missing), "{second:?}");
}

/// Regression (defect A): a directory in a secret's place was never healed: `repair` renamed
/// a fresh file over it, which fails on a directory, on every tick.
#[test]
fn a_secret_replaced_by_a_directory_is_healed() {
    let (_, new) = heal_case(
        "fx-web",
        "api-token",
        |p| {
            fs::remove_file(p).unwrap();
            fs::create_dir_all(p.join("inside/deeper")).unwrap();
            fs::write(p.join("inside/file"), "x").unwrap();
        },
        HealReason::Malformed,
    );
    assert_eq!(new.len(), 64);
}

#[test]
fn a_bcrypt_password_replaced_by_a_directory_is_healed() {
    heal_case(
        "fx-gateway",
        "gateway-hash.pw",
        |p| {
            fs::remove_file(p).unwrap();
            fs::create_dir(p).unwrap();
        },
        HealReason::Malformed,
    );
}

#[test]
fn heals_a_secret_replaced_by_a_fifo_without_blocking() {
    heal_case(
        "fx-web",
        "api-token",
        |p| {
            fs::remove_file(p).unwrap();
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        },
        HealReason::Malformed,
    );
}

/// Regression: the lock file was opened with `O_NOFOLLOW`, so a symlink planted in its place
/// failed every ensure of the app instead of being replaced like any other planted link.
#[test]
fn a_lock_file_replaced_by_a_symlink_fifo_or_directory_is_replaced_not_followed() {
    let root = tempfile::tempdir().unwrap();
    let m = app("fx-web");
    secrets::ensure(root.path(), &m).unwrap();
    let lock = root.path().join("fx-web/.lock");
    let victim = root.path().join("victim");
    fs::write(&victim, "untouched").unwrap();
    for what in ["symlink", "fifo", "directory"] {
        fs::remove_file(&lock).unwrap();
        match what {
            "symlink" => std::os::unix::fs::symlink(&victim, &lock).unwrap(),
            "fifo" => nix::unistd::mkfifo(&lock, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap(),
            _ => fs::create_dir(&lock).unwrap(),
        }
        // Damage too, so that the ensure needs the lock.
        fs::write(root.path().join("fx-web/api-token"), "").unwrap();
        let e = secrets::ensure(root.path(), &m).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(outcomes(&e), [("api-token", Outcome::Healed(HealReason::Empty))], "{what}");
        let meta = fs::symlink_metadata(&lock).unwrap();
        assert!(meta.is_file() && meta.mode() & 0o7777 == 0o600, "{what}: {meta:?}");
        assert_eq!(read(&victim), "untouched", "{what}: the link was followed");
    }
}

/// `archy-agent secrets ensure ARGS --catalog apps --dir DIR`: the built binary.
fn cli(args: &[&str], dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(agent_bin());
    cmd.args(["secrets", "ensure"])
        .args(args)
        .arg("--catalog")
        .arg(repo_root().join("apps"))
        .arg("--dir")
        .arg(dir);
    cmd
}

/// Regression: the agent did not start on a read-only data root: ensuring the API token
/// opened the lock file for writing even when every secret was valid (EROFS).
#[test]
fn valid_secrets_on_a_read_only_data_root_are_kept_without_writing() {
    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    for id in ["fx-web", "fx-client"] {
        expect_code(&mut cli(&[id], &secrets), 0);
    }
    // A real read-only mount, in a mount namespace of its own: root ignores mode bits.
    for id in ["fx-web", "fx-client"] {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args([
            "--mount",
            "sh",
            "-c",
            r#"mount --bind -o ro "$1" "$1" && exec "$2" secrets ensure "$3" --catalog "$4" --dir "$1""#,
            "sh",
        ])
        .arg(&secrets)
        .arg(agent_bin())
        .arg(id)
        .arg(repo_root().join("apps"));
        let out = expect_code(&mut cmd, 0);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(": kept") && !stdout.contains("generated"), "{}", describe(&cmd, &out));
    }
}

/// Regression: `secrets ensure` generated the app's own secrets and wrote its environment
/// file before finding out that a secret it reads was missing, and then failed with an I/O
/// error on reading it instead of exit 3.
#[test]
fn secrets_ensure_checks_references_before_writing_anything() {
    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    let mut cmd = cli(&["fx-client"], &secrets);
    let out = expect_code(&mut cmd, 3);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("fx-client: reads fx-web/api-token which is missing: run `archy-agent secrets ensure fx-web` first"),
        "{}",
        describe(&cmd, &out)
    );
    assert!(!secrets.exists(), "nothing may be written before the references are checked");
}

/// Regression: an existing `--dir` with another mode was chmod-ed to 0700 (`--dir /tmp`
/// would have locked every other user out of /tmp).
#[test]
fn secrets_ensure_refuses_a_dir_with_a_wrong_mode_and_leaves_it_alone() {
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let mut cmd = cli(&["fx-web"], &shared);
    let out = expect_code(&mut cmd, 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has mode 1777, not 700"), "{}", describe(&cmd, &out));
    assert_eq!(mode(&shared), 0o1777, "the directory was changed");
    assert_eq!(fs::read_dir(&shared).unwrap().count(), 0, "something was written");
}

/// Regression: errors printed their cause twice (`{:#}` over errors whose message already
/// holds their source).
#[test]
fn a_secrets_error_prints_its_cause_once() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("a-file");
    fs::write(&file, "").unwrap();
    let mut cmd = cli(&["fx-web"], &file.join("secrets"));
    let out = expect_code(&mut cmd, 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{}", describe(&cmd, &out));
    assert!(stderr.starts_with("error: ") && stderr.contains(&file.display().to_string()), "{stderr}");
}

/// Regression: a directory named like a temp file (`.x.tmp`) was removed as a file, which
/// failed every ensure of the app.
#[test]
fn a_directory_named_like_a_temp_file_does_not_stop_ensure() {
    let root = tempfile::tempdir().unwrap();
    let m = app("fx-web");
    secrets::ensure(root.path(), &m).unwrap();
    fs::create_dir(root.path().join("fx-web/.api-token.1.deadbeef.tmp")).unwrap();
    fs::write(root.path().join("fx-web/api-token"), "").unwrap();
    assert_eq!(
        outcomes(&secrets::ensure(root.path(), &m).unwrap()),
        [("api-token", Outcome::Healed(HealReason::Empty))]
    );
}
