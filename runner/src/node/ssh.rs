//! A real node over the OpenSSH client: the same primitives as a local node, each a command
//! run on the node (configurable, since platforms differ in how they reboot or where the agent
//! keeps its token), in batch mode so nothing ever waits for a password.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::json;

use super::{Evidence, Node};

/// The command run on the node for each primitive. `{signal}` and `{app}` are substituted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshCommands {
    pub power_cut: String,
    pub reboot: String,
    pub kill_agent: String,
    pub restart_agent: String,
    pub agent_pid: String,
    pub kill_container: String,
    pub partition: Option<String>,
    pub heal: Option<String>,
    /// Prints the agent's API token.
    pub token: String,
}

impl Default for SshCommands {
    fn default() -> SshCommands {
        SshCommands {
            // sysrq "b": an immediate reset without syncing or unmounting, a real power cut.
            power_cut: "sudo sh -c 'echo b > /proc/sysrq-trigger'".into(),
            reboot: "sudo systemctl reboot".into(),
            kill_agent: "systemctl --user kill -s {signal} archy-agent.service".into(),
            restart_agent: "systemctl --user restart archy-agent.service".into(),
            agent_pid: "systemctl --user show -p MainPID --value archy-agent.service".into(),
            kill_container: "kill -s {signal} $(podman inspect -f '{{.State.Pid}}' archy-{app})".into(),
            partition: None,
            heal: None,
            token: "cat ~/.local/share/archy/agent/api-token".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SshNode {
    /// `user@host`
    pub destination: String,
    pub port: u16,
    pub identity: Option<PathBuf>,
    /// Known-hosts file; the user's own by default. A new host's key is accepted on first
    /// use, a changed one refused.
    pub known_hosts: Option<PathBuf>,
    /// The agent's API address as the runner reaches it (directly or through a tunnel).
    pub api: String,
    pub commands: SshCommands,
    /// How long a reboot may take to go down and come back.
    pub reboot_timeout: Duration,
}

impl SshNode {
    /// `ssh://user@host[:port]`.
    pub fn parse(url: &str, api: &str, identity: Option<PathBuf>, commands: SshCommands) -> Result<SshNode> {
        let rest =
            url.strip_prefix("ssh://").with_context(|| format!("`{url}` is not ssh://user@host[:port]"))?;
        let (dest, port) = match rest.rsplit_once(':') {
            Some((d, p)) => (
                d,
                p.parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .with_context(|| format!("bad port in `{url}` (1-65535)"))?,
            ),
            None => (rest, 22),
        };
        ensure!(
            dest.contains('@') && !dest.starts_with('@') && !dest.ends_with('@'),
            "`{url}` needs a user: ssh://user@host"
        );
        Ok(SshNode {
            destination: dest.into(),
            port,
            identity,
            known_hosts: None,
            api: api.into(),
            commands,
            reboot_timeout: Duration::from_secs(600),
        })
    }

    fn ssh(&self, remote: &str, timeout_secs: u64) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"])
            .args([
                "-o",
                &format!("ConnectTimeout={timeout_secs}"),
                "-o",
                "ServerAliveInterval=2",
                "-o",
                "ServerAliveCountMax=2",
            ])
            .args(["-p", &self.port.to_string()]);
        if let Some(k) = &self.known_hosts {
            c.arg("-o").arg(format!("UserKnownHostsFile={}", k.display()));
        }
        if let Some(id) = &self.identity {
            c.arg("-i").arg(id).args(["-o", "IdentitiesOnly=yes"]);
        }
        c.arg(&self.destination).arg("--").arg(remote).stdin(Stdio::null());
        c
    }

    /// Runs `remote` (a shell command line) on the node.
    pub fn run(&self, remote: &str) -> Result<Output> {
        self.ssh(remote, 10).output().context("running ssh (is openssh-client installed?)")
    }

    fn run_ok(&self, remote: &str) -> Result<String> {
        let out = self.run(remote)?;
        ensure!(
            out.status.success(),
            "on {}: `{remote}` failed ({}): {}",
            self.destination,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fires a command that may take the host, and so the connection, down: ssh's own 255
    /// (connection lost) is expected; any other failure is the command's.
    fn fire(&self, remote: &str) -> Result<()> {
        let out = self.ssh(remote, 10).output().context("running ssh")?;
        ensure!(
            out.status.success() || out.status.code() == Some(255),
            "on {}: `{remote}` failed ({}): {}",
            self.destination,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// The agent's instance id, if it answers.
    fn instance(&self) -> Option<String> {
        super::Node::agent(self).status().ok().map(|s| s.instance)
    }

    /// Fires a command that restarts the node, and waits until an agent answers again as a
    /// new process. The changed instance is the evidence that the fault took effect.
    fn restart_with(&self, fault: &str, remote: &str) -> Result<Evidence> {
        let before = self.instance().context("the agent does not answer before the fault")?;
        let start = Instant::now();
        self.fire(remote)?;
        loop {
            ensure!(
                start.elapsed() < self.reboot_timeout,
                "{}: no new agent within {:?}",
                self.destination,
                self.reboot_timeout
            );
            if let Some(now) = self.instance().filter(|i| *i != before) {
                return Ok(Evidence::of(json!({
                    "fault": fault,
                    "host": self.destination,
                    "agent_instance_before": before,
                    "agent_instance_after": now,
                    "back_after_seconds": start.elapsed().as_secs_f64(),
                })));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ready(&self, start: Instant) -> Result<Duration> {
        let http =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(2))).build().new_agent();
        let url = format!("http://{}/readyz", self.api);
        while start.elapsed() < self.reboot_timeout {
            if http.get(&url).call().is_ok_and(|r| r.status() == 200) {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("{}: agent not ready at {url} within {:?}", self.destination, self.reboot_timeout)
    }

    fn agent_pid(&self) -> Result<u32> {
        Ok(self.run_ok(&self.commands.agent_pid)?.trim().parse().unwrap_or(0))
    }
}

impl Node for SshNode {
    fn name(&self) -> &str {
        &self.destination
    }

    fn api_addr(&self) -> String {
        self.api.clone()
    }

    fn token(&self) -> Result<String> {
        Ok(self.run_ok(&self.commands.token)?.trim().to_string())
    }

    fn boot(&self) -> Result<Duration> {
        // A real host boots by itself after a power cut; booting means waiting for it.
        self.wait_ready(Instant::now())
    }

    fn power_cut(&self) -> Result<Evidence> {
        self.restart_with("power_cut", &self.commands.power_cut)
    }

    fn graceful_reboot(&self) -> Result<Evidence> {
        self.restart_with("graceful_reboot", &self.commands.reboot)
    }

    fn kill_agent(&self, signal: &str) -> Result<Evidence> {
        let before = self.agent_pid()?;
        self.run_ok(&self.commands.kill_agent.replace("{signal}", signal))?;
        Ok(Evidence::of(json!({"fault": "kill_agent", "signal": signal, "agent_pid_before": before})))
    }

    fn restart_agent(&self) -> Result<Evidence> {
        let before = self.agent_pid()?;
        self.run_ok(&self.commands.restart_agent)?;
        let after = self.agent_pid()?;
        Ok(Evidence::of(
            json!({"fault": "restart_agent", "agent_pid_before": before, "agent_pid_after": after}),
        )
        .effect(before != after))
    }

    fn kill_container(&self, app: &str, signal: &str) -> Result<Evidence> {
        self.run_ok(&self.commands.kill_container.replace("{signal}", signal).replace("{app}", app))?;
        Ok(Evidence::of(json!({"fault": "kill_container", "app": app, "signal": signal})))
    }

    fn partition(&self) -> Result<Evidence> {
        let cmd =
            self.commands.partition.as_deref().context("no partition command configured for this node")?;
        self.fire(cmd)?;
        Ok(Evidence::of(json!({"fault": "partition", "host": self.destination})))
    }

    fn heal(&self) -> Result<Evidence> {
        let cmd = self.commands.heal.as_deref().context("no heal command configured for this node")?;
        self.run_ok(cmd)?;
        Ok(Evidence::of(json!({"fault": "heal", "host": self.destination})))
    }

    fn exec(&self, argv: &[&str]) -> Result<Output> {
        let line: Vec<String> = argv.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
        self.run(&line.join(" "))
    }

    // Placeholders until the file access over SSH lands (same branch, next commit).
    fn url(&self) -> String {
        format!("ssh://{}:{}", self.destination, self.port)
    }
    fn root_on_node(&self) -> std::path::PathBuf {
        std::path::PathBuf::new()
    }
    fn service_uid(&self) -> Result<u32> {
        bail!("not yet over SSH")
    }
    fn read(&self, _: &str) -> Result<Option<Vec<u8>>> {
        bail!("not yet over SSH")
    }
    fn write(&self, _: &str, _: &[u8]) -> Result<()> {
        bail!("not yet over SSH")
    }
    fn stat(&self, _: &str) -> Result<Option<super::Stat>> {
        bail!("not yet over SSH")
    }
    fn hash(&self, _: &str) -> Result<Option<String>> {
        bail!("not yet over SSH")
    }
    fn list(&self, _: &str) -> Result<Vec<String>> {
        bail!("not yet over SSH")
    }
    fn remove(&self, _: &str) -> Result<bool> {
        bail!("not yet over SSH")
    }
    fn damage(&self, _: &str, _: super::FileFault) -> Result<()> {
        bail!("not yet over SSH")
    }
    fn log(&self, _: usize) -> Result<String> {
        bail!("not yet over SSH")
    }
    fn catalog(&self) -> Result<archy_agent::manifest::Catalog> {
        bail!("not yet over SSH")
    }
}
