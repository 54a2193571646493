//! `archy-agent doctor`: a rootless preflight. Each check names what it found and, when it
//! is not right, the command that fixes it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use crate::agent::{detect_backend, USER_GENERATOR};
use crate::config::Config;
use crate::exec::Exec;
use crate::manifest::Catalog;
use crate::metrics::Metrics;
use crate::runtime::BackendKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, with a limitation worth knowing.
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub found: String,
    pub fix: String,
}

fn check(name: &'static str, verdict: Verdict, found: impl Into<String>, fix: impl Into<String>) -> Check {
    let fix = if verdict == Verdict::Ok { String::new() } else { fix.into() };
    Check { name, verdict, found: found.into(), fix }
}

fn ok_if(b: bool) -> Verdict {
    if b {
        Verdict::Ok
    } else {
        Verdict::Fail
    }
}

fn subid_count(file: &str, user: &str, uid: u32) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (who, _, count) = (f.next()?, f.next()?, f.next()?);
            (who == user || who == uid.to_string()).then(|| count.trim().parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// Every check, in the order a person would fix them.
pub fn checks(config: &Config) -> Vec<Check> {
    let uid = nix::unistd::geteuid();
    let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    let mut out = Vec::new();

    out.push(check(
        "service user",
        ok_if(!uid.is_root()),
        format!("running as {user} (uid {uid})"),
        "run the agent as an unprivileged service user, never root",
    ));
    for (name, file, flag) in
        [("subuid range", "/etc/subuid", "--add-subuids"), ("subgid range", "/etc/subgid", "--add-subgids")]
    {
        let n = subid_count(file, &user, uid.as_raw());
        out.push(check(
            name,
            ok_if(n >= 65536),
            format!("{n} ids for {user} in {file}"),
            format!("usermod {flag} 100000-165535 {user}"),
        ));
    }
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
    let rd = runtime_dir.as_deref().and_then(|p| std::fs::metadata(p).ok().map(|m| (p.to_path_buf(), m)));
    out.push(match rd {
        Some((p, m)) if m.uid() == uid.as_raw() && m.mode() & 0o777 == 0o700 => {
            check("XDG_RUNTIME_DIR", Verdict::Ok, p.display().to_string(), "")
        }
        Some((p, m)) => check(
            "XDG_RUNTIME_DIR",
            Verdict::Fail,
            format!("{} is owned by uid {} with mode {:o}", p.display(), m.uid(), m.mode() & 0o777),
            format!("chown {user} {0} && chmod 0700 {0}", p.display()),
        ),
        None => check(
            "XDG_RUNTIME_DIR",
            Verdict::Fail,
            "unset or missing",
            format!("loginctl enable-linger {user}, then log in again (or export XDG_RUNTIME_DIR=/run/user/{uid})"),
        ),
    });
    let backend = detect_backend(config.backend);
    if backend == BackendKind::Quadlet {
        let linger = Path::new("/var/lib/systemd/linger").join(&user);
        out.push(check(
            "lingering",
            if linger.exists() { Verdict::Ok } else { Verdict::Warn },
            if linger.exists() { "enabled".into() } else { format!("{} missing", linger.display()) },
            format!("loginctl enable-linger {user}: without it the user's units die at logout"),
        ));
    }
    let generator = Path::new(USER_GENERATOR).exists();
    out.push(check(
        "Quadlet generator",
        if generator {
            Verdict::Ok
        } else if backend == BackendKind::Quadlet {
            Verdict::Fail
        } else {
            Verdict::Warn
        },
        if generator {
            USER_GENERATOR.to_string()
        } else {
            format!("{USER_GENERATOR} missing: backend {}", backend.as_str())
        },
        "install podman >= 4.4 (on Debian 12: scripts/setup-host takes it from trixie's podman)",
    ));
    let cgroup2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    out.push(check(
        "cgroup version",
        if cgroup2 { Verdict::Ok } else { Verdict::Warn },
        if cgroup2 { "v2 (unified)" } else { "v1 or hybrid: rootless memory limits are ignored" },
        "boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2",
    ));

    if cgroup2 {
        let memory = crate::agent::memory_controller();
        out.push(check(
            "memory controller",
            if memory { Verdict::Ok } else { Verdict::Warn },
            if memory {
                "delegated: memory limits apply"
            } else {
                "not delegated: memory limits are left out of units"
            },
            "delegate it to the user manager (systemd: Delegate=memory pids on user@.service)",
        ));
    }

    let exec = Exec::new(config.exec(), Arc::new(Metrics::new(backend.as_str())));
    // As root, or without a runtime dir, podman would answer for another setup than the
    // agent's (root's storage, a /tmp fallback): fix those first.
    let runtime_dir_ok = out.iter().any(|c| c.name == "XDG_RUNTIME_DIR" && c.verdict == Verdict::Ok);
    let info = if uid.is_root() {
        Ok("- - skipped-as-root".to_string())
    } else if !runtime_dir_ok {
        Ok("- - skipped-until-XDG_RUNTIME_DIR-is-fixed".to_string())
    } else {
        exec.podman(&[
            "info",
            "--format",
            "{{.Version.Version}} {{.Host.OCIRuntime.Name}} {{.Host.Security.Rootless}}",
        ])
    };
    let words: Result<Vec<&str>, _> = info.as_deref().map(|s| s.split_whitespace().collect());
    out.push(match words.as_deref() {
        Ok([version, runtime, rootless]) => {
            let old = version.split('.').next().and_then(|m| m.parse::<u32>().ok()).is_none_or(|m| m < 4);
            let verdict = if old || *rootless != "true" { Verdict::Fail } else { Verdict::Ok };
            check(
                "podman",
                verdict,
                format!("podman {version}, runtime {runtime}, rootless {rootless}"),
                "install podman >= 4 and run as the service user",
            )
        }
        Ok(other) => check(
            "podman",
            Verdict::Fail,
            format!("unexpected `podman info`: {other:?}"),
            "check the podman install",
        ),
        Err(e) => {
            check("podman", Verdict::Fail, e.to_string(), "apt-get install podman runc uidmap slirp4netns")
        }
    });
    let tun =
        nix::unistd::access("/dev/net/tun", nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK)
            .is_ok();
    out.push(check(
        "/dev/net/tun",
        ok_if(tun),
        if tun { "usable" } else { "not readable and writable by this user" },
        "chmod 0666 /dev/net/tun (rootless networking opens it)",
    ));
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    let (catalog, _) = Catalog::load_lenient(&config.catalog);
    let low = catalog.apps.values().flat_map(|m| m.ports.iter().map(|p| p.host)).min();
    out.push(check(
        "unprivileged ports",
        ok_if(low.is_none_or(|p| p >= start)),
        format!(
            "ports from {start} bindable; lowest catalog host port {}",
            low.map_or("-".into(), |p| p.to_string())
        ),
        format!("sysctl net.ipv4.ip_unprivileged_port_start={}", low.unwrap_or(start)),
    ));
    let root = &config.data_root;
    let _ = std::fs::create_dir_all(root);
    out.push(match std::fs::metadata(root) {
        Ok(m)
            if m.uid() == uid.as_raw()
                && nix::unistd::access(root, nix::unistd::AccessFlags::W_OK).is_ok() =>
        {
            check("data root", Verdict::Ok, root.display().to_string(), "")
        }
        Ok(m) => check(
            "data root",
            Verdict::Fail,
            format!("{} is owned by uid {}", root.display(), m.uid()),
            format!("chown -R {user} {}", root.display()),
        ),
        Err(e) => check(
            "data root",
            Verdict::Fail,
            format!("{}: {e}", root.display()),
            format!("mkdir -p {0} && chown {user} {0}", root.display()),
        ),
    });
    out
}

/// Prints the checks as a table; true when none failed.
pub fn run(config: &Config) -> bool {
    let checks = checks(config);
    let rows: Vec<[String; 4]> = checks
        .iter()
        .map(|c| {
            let v = match c.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            [v.to_string(), c.name.to_string(), c.found.clone(), c.fix.clone()]
        })
        .collect();
    let mut table = tabled::builder::Builder::default();
    table.push_record(["", "check", "found", "fix"]);
    for r in rows {
        table.push_record(r);
    }
    println!("{}", table.build().with(tabled::settings::Style::sharp()));
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    if failed > 0 {
        println!("{failed} check(s) failed: fix them in the order listed");
    }
    failed == 0
}
