//! `archy-agent secrets ensure` run as the unprivileged service user: a secret chowned to
//! root and one made world-readable are both healed without privilege, and end up owned
//! by the service user with mode 0600.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use support::*;

#[test]
fn service_user_heals_root_owned_and_world_readable_secrets() {
    let (user, uid, gid) = service_user();
    let home = tempfile::tempdir().unwrap();
    fs::create_dir(home.path().join("run")).unwrap();
    let secrets = home.path().join("secrets");
    nix::unistd::chown(home.path(), Some(uid.into()), Some(gid.into())).unwrap();
    nix::unistd::chown(&home.path().join("run"), Some(uid.into()), Some(gid.into())).unwrap();
    let ensure = |app: &str| {
        let mut cmd = as_user(&user, home.path(), &agent_bin());
        cmd.args(["secrets", "ensure", app, "--catalog"])
            .arg(repo_root().join("apps"))
            .arg("--dir")
            .arg(&secrets);
        String::from_utf8(expect_code(&mut cmd, 0).stdout).unwrap()
    };

    let out = ensure("fx-gateway");
    assert!(out.contains("fx-gateway/gateway-hash (bcrypt): generated"), "{out}");
    let hash = secrets.join("fx-gateway/gateway-hash");
    let pw = secrets.join("fx-gateway/gateway-hash.pw");
    for p in [&hash, &pw] {
        let m = fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o600), "{}", p.display());
    }

    // The faults: the hash handed to root (unreadable to the user), the password chmod 0644.
    nix::unistd::chown(&hash, Some(0.into()), Some(0.into())).unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o644)).unwrap();
    let out = ensure("fx-gateway");
    assert!(out.contains("healed (wrong_mode)"), "{out}");
    for p in [&hash, &pw] {
        let m = fs::metadata(p).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (uid, gid, 0o600), "{} not healed", p.display());
    }
    let (pw_text, hash_text) = (fs::read_to_string(&pw).unwrap(), fs::read_to_string(&hash).unwrap());
    assert!(bcrypt::verify(&pw_text, &hash_text).unwrap());

    // Only the owner changed this time: root-owned, mode 0600, content still valid.
    nix::unistd::chown(&hash, Some(0.into()), Some(0.into())).unwrap();
    let out = ensure("fx-gateway");
    assert!(out.contains("healed (wrong_owner)"), "{out}");
    assert_eq!(fs::metadata(&hash).unwrap().uid(), uid);
    assert_eq!(fs::read_to_string(&pw).unwrap(), pw_text, "the password was valid and must be kept");

    // And a third run changes nothing.
    assert!(ensure("fx-gateway").contains("fx-gateway/gateway-hash (bcrypt): kept"));
}
