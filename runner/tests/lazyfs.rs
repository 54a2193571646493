//! The lazy data root's filesystem itself (real FUSE, as root): what a power cut keeps and
//! drops, against a small program of writes, renames and syncs.

mod support;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A lazy mount over a fresh backing directory, unmounted (flushed) on drop.
struct Lazy {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mount: PathBuf,
    control: PathBuf,
    child: Child,
}

impl Lazy {
    fn new() -> Lazy {
        let dir = tempfile::Builder::new().prefix("lazyfs").tempdir_in(support::nodes_dir()).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (backing, mount, control) =
            (dir.path().join("backing"), dir.path().join("mnt"), dir.path().join("ctl"));
        for d in [&backing, &mount] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let child = support::chaos_cmd(&[
            "lazyfs",
            &backing.display().to_string(),
            &mount.display().to_string(),
            &control.display().to_string(),
        ])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
        let lazy = Lazy { _dir: dir, backing, mount, control, child };
        let start = Instant::now();
        while !lazy.mounted() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the lazy filesystem did not mount (is /dev/fuse here?)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        lazy
    }

    fn mounted(&self) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        self.control.exists()
            && info.lines().any(|l| l.contains(&*self.mount.to_string_lossy()) && l.contains("archy-lazy"))
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.mount.join(rel)
    }

    fn command(&mut self, line: &str) -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{line}: {e}: {answer}"))
    }

    /// The power cut: what was lost; the filesystem is unmounted after it.
    fn cut(&mut self, seed: u64, tear: bool) -> Value {
        let lost = self.command(&format!("cut {seed}{}", if tear { " tear" } else { "" }));
        assert!(self.child.wait().unwrap().success());
        assert!(!self.mounted());
        lost
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.backing.join(rel)).ok()
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = std::os::unix::net::UnixStream::connect(&self.control)
                .and_then(|mut s| writeln!(s, "unmount"));
            let _ = self.child.wait();
        }
    }
}

fn write_file(path: &Path, data: &str, sync: bool) {
    let mut f = File::create(path).unwrap();
    f.write_all(data.as_bytes()).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

/// The program: a file synced, one not, one synced but not its directory entry.
fn program(root: &Path) {
    write_file(&root.join("synced"), "A", true);
    write_file(&root.join("unsynced"), "B", false);
    write_file(&root.join("undirred"), "C", true);
}

#[test]
fn unsynced_bytes_are_gone_after_a_cut_and_synced_ones_stay() {
    let mut fs = Lazy::new();
    std::fs::write(fs.backing.join("old"), "old content").unwrap(); // there before: synced
    std::fs::create_dir(fs.backing.join("d")).unwrap();
    write_file(&fs.at("synced"), "A", true);
    write_file(&fs.at("unsynced"), "B", false);
    sync_dir(&fs.mount);
    write_file(&fs.at("d/undirred"), "C", true); // its data synced, its directory entry not
    let mut old = OpenOptions::new().write(true).open(fs.at("old")).unwrap();
    old.write_all(b"new content, longer").unwrap();
    drop(old);
    assert_eq!(std::fs::read_to_string(fs.at("old")).unwrap(), "new content, longer");

    let lost = fs.cut(1, false);
    assert_eq!(fs.read("synced").as_deref(), Some("A"), "{lost}");
    assert_eq!(fs.read("unsynced").as_deref(), Some(""), "its entry was synced, its bytes not: {lost}");
    assert_eq!(fs.read("old").as_deref(), Some("old content"), "{lost}");
    assert_eq!(fs.read("d/undirred"), None, "{lost}");
    let files: Vec<&str> = lost["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(files.contains(&"unsynced") && files.contains(&"old") && !files.contains(&"synced"), "{lost}");
    assert_eq!(lost["bytes"], 1 + 19, "{lost}");
    assert_eq!(lost["entries"], serde_json::json!(["created d/undirred"]), "{lost}");
}

#[test]
fn a_rename_or_unlink_without_a_directory_fsync_is_reverted() {
    let mut fs = Lazy::new();
    std::fs::write(fs.backing.join("state.json"), "v1").unwrap();
    std::fs::write(fs.backing.join("secret"), "s3cret").unwrap();
    // The write-temp, fsync, rename pattern, without the directory fsync at the end.
    write_file(&fs.at("state.json.tmp"), "v2", true);
    std::fs::rename(fs.at("state.json.tmp"), fs.at("state.json")).unwrap();
    std::fs::remove_file(fs.at("secret")).unwrap();
    assert_eq!(std::fs::read_to_string(fs.at("state.json")).unwrap(), "v2");

    let lost = fs.cut(1, false);
    assert_eq!(fs.read("state.json").as_deref(), Some("v1"), "{lost}");
    assert_eq!(fs.read("secret").as_deref(), Some("s3cret"), "{lost}");
    assert_eq!(fs.read("state.json.tmp"), None, "its create was never synced either: {lost}");
    assert_eq!(
        lost["entries"],
        serde_json::json!([
            "removed secret",
            "renamed state.json.tmp -> state.json",
            "created state.json.tmp"
        ]),
        "{lost}"
    );

    // The same with the directory fsync: kept.
    let mut fs = Lazy::new();
    std::fs::write(fs.backing.join("state.json"), "v1").unwrap();
    write_file(&fs.at("state.json.tmp"), "v2", true);
    std::fs::rename(fs.at("state.json.tmp"), fs.at("state.json")).unwrap();
    sync_dir(&fs.mount);
    let lost = fs.cut(1, false);
    assert_eq!(fs.read("state.json").as_deref(), Some("v2"), "{lost}");
    assert_eq!(lost["entries"], serde_json::json!([]), "{lost}");
}

/// A purge: a whole tree removed, and only its top's removal synced (in its parent). The cut
/// put the tree's inner entries back at the root of the filesystem, the path of a directory
/// that no longer had one.
#[test]
fn bug_a_cut_restored_the_insides_of_a_removed_tree_at_the_root() {
    let mut fs = Lazy::new();
    std::fs::create_dir_all(fs.backing.join("apps/web/data/www")).unwrap();
    std::fs::write(fs.backing.join("apps/web/data/www/index.html"), "hi").unwrap();
    std::fs::remove_dir_all(fs.at("apps/web")).unwrap();
    sync_dir(&fs.at("apps"));
    let lost = fs.cut(1, false);
    assert_eq!(std::fs::read_dir(&fs.backing).unwrap().count(), 2, "apps and the undo dir only: {lost}");
    assert!(!fs.backing.join("apps/web").exists() && !fs.backing.join("data").exists(), "{lost}");
    assert_eq!(lost["entries"], serde_json::json!([]), "{lost}");
}

#[test]
fn a_torn_write_keeps_a_seeded_prefix_of_the_last_unsynced_write() {
    let mut fs = Lazy::new();
    std::fs::write(fs.backing.join("f"), "0000000000").unwrap();
    let mut f = OpenOptions::new().write(true).open(fs.at("f")).unwrap();
    f.write_all(b"1111111111").unwrap();
    drop(f);
    let lost = fs.cut(7, true);
    let torn = lost["torn"][0].as_str().unwrap_or_else(|| panic!("{lost}"));
    let kept: usize = torn.strip_prefix("f: ").unwrap().split('/').next().unwrap().parse().unwrap();
    assert_eq!(fs.read("f").unwrap(), format!("{}{}", "1".repeat(kept), "0".repeat(10 - kept)), "{lost}");
    // The seed decides the prefix: the same cut again keeps the same.
    let mut again = Lazy::new();
    std::fs::write(again.backing.join("f"), "0000000000").unwrap();
    OpenOptions::new().write(true).open(again.at("f")).unwrap().write_all(b"1111111111").unwrap();
    assert_eq!(again.cut(7, true)["torn"], lost["torn"]);
}

#[test]
fn a_clean_shutdown_and_the_kernel_path_keep_everything() {
    let check = |root: &Path| {
        assert_eq!(std::fs::read_to_string(root.join("synced")).unwrap(), "A");
        assert_eq!(std::fs::read_to_string(root.join("unsynced")).unwrap(), "B");
        assert_eq!(std::fs::read_to_string(root.join("undirred")).unwrap(), "C");
    };
    // The kernel path: a plain directory, where a killed process's writes stay in the page cache.
    let plain = tempfile::tempdir().unwrap();
    program(plain.path());
    check(plain.path());
    // The lazy path, shut down cleanly.
    let mut fs = Lazy::new();
    program(&fs.mount.clone());
    let mut names: Vec<_> = std::fs::read_dir(&fs.mount).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["synced", "undirred", "unsynced"], "the undo directory is not in the view");
    assert!(!fs.at(".archy-lazy-undo").exists());
    assert_eq!(fs.command("unmount"), serde_json::json!({}));
    assert!(fs.child.wait().unwrap().success());
    check(&fs.backing);
}

#[test]
fn files_made_by_the_service_user_are_theirs_with_their_modes() {
    let mut fs = Lazy::new();
    let dir = fs.backing.join("apps");
    std::fs::create_dir(&dir).unwrap();
    let archy =
        nix::unistd::User::from_name("archy").unwrap().expect("scripts/setup-host makes the service user");
    nix::unistd::chown(&dir, Some(archy.uid), Some(archy.gid)).unwrap();
    let script = format!(
        "umask 077 && echo x > {0}/f && mkdir {0}/d && ln -s f {0}/l && chmod 640 {0}/f && sync {0}/f",
        fs.at("apps").display()
    );
    let out = std::process::Command::new("runuser")
        .args(["-u", "archy", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (name, mode) in [("f", 0o640), ("d", 0o700)] {
        let m = std::fs::metadata(dir.join(name)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (archy.uid.as_raw(), archy.gid.as_raw(), mode),
            "{name}"
        );
    }
    assert_eq!(std::fs::read_link(dir.join("l")).unwrap(), Path::new("f"));
    // Another user cannot read what is the service user's alone (the kernel checks the modes).
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--", "cat", &fs.at("apps/d").join("x").display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let lost = fs.cut(1, false);
    assert!(lost["entries"].as_array().unwrap().len() >= 3, "{lost}");
}
