//! `archy-agent run` configuration: a YAML file (`--config`), every field also a flag, and
//! defaults that suit an unprivileged service user.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::manifest::Dur;
use crate::quadlet::PodmanVersion;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Quadlet where a systemd user manager and the Quadlet generator are present, else podman.
    Auto,
    Podman,
    Quadlet,
}

/// Default API port; loopback only unless configured otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8719";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// State, secrets (`secrets/`) and app data (`apps/`) live here.
    pub data_root: PathBuf,
    /// The app catalog: `<id>/manifest.yml` directories.
    pub catalog: PathBuf,
    pub listen: SocketAddr,
    pub tick_interval: Dur,
    pub backend: BackendChoice,
    pub podman: PathBuf,
    /// Global podman arguments, e.g. `--root` and `--runroot` to give a node its own storage.
    pub podman_args: Vec<String>,
    pub systemctl: PathBuf,
    /// The user's Quadlet unit directory.
    pub quadlet_dir: PathBuf,
    /// Cgroup directory (delegated to the user) that podman calls are moved into, so that
    /// containers do not live in the agent's cgroup (podman backend without systemd).
    pub podman_cgroup: Option<PathBuf>,
    /// Version of podman on the node; asked of podman at start-up when unset.
    pub podman_version: Option<String>,
    /// Longest a podman or systemctl call may take (builds get 30 min).
    pub exec_timeout: Dur,
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var).filter(|v| !v.is_empty()).map_or_else(|| home().join(fallback), PathBuf::from)
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_root: xdg("XDG_DATA_HOME", ".local/share").join("archy"),
            catalog: PathBuf::from("apps"),
            listen: DEFAULT_LISTEN.parse().expect("valid address"),
            tick_interval: Dur(Duration::from_secs(30)),
            backend: BackendChoice::Auto,
            podman: PathBuf::from("podman"),
            podman_args: Vec::new(),
            systemctl: PathBuf::from("systemctl"),
            quadlet_dir: xdg("XDG_CONFIG_HOME", ".config").join("containers/systemd"),
            podman_cgroup: None,
            podman_version: None,
            exec_timeout: Dur(Duration::from_secs(120)),
        }
    }
}

/// Flags of `archy-agent run`; each overrides the config file's field of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// YAML file with any of the fields below (snake_case names).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node data root [default: $XDG_DATA_HOME/archy]
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// App catalog directory [default: apps]
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// API address [default: 127.0.0.1:8719]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Reconcile interval, e.g. 30s [default: 30s]
    #[arg(long)]
    pub tick_interval: Option<Dur>,
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// podman binary [default: podman]
    #[arg(long)]
    pub podman: Option<PathBuf>,
    /// A global podman argument (repeat for several), e.g. --podman-arg=--root=/x
    #[arg(long = "podman-arg", allow_hyphen_values = true)]
    pub podman_args: Vec<String>,
    /// systemctl binary [default: systemctl]
    #[arg(long)]
    pub systemctl: Option<PathBuf>,
    /// Quadlet unit directory [default: $XDG_CONFIG_HOME/containers/systemd]
    #[arg(long)]
    pub quadlet_dir: Option<PathBuf>,
    /// Cgroup directory podman calls are moved into (podman backend without systemd)
    #[arg(long)]
    pub podman_cgroup: Option<PathBuf>,
    /// Podman version on the node, e.g. 4.3.1 [default: asked of podman]
    #[arg(long)]
    pub podman_version: Option<PodmanVersion>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read the config file: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
}

impl Config {
    pub fn resolve(args: RunArgs) -> Result<Config, Error> {
        let mut c = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = args.$f { c.$f = v; } )* };
        }
        set!(data_root, catalog, listen, tick_interval, backend, podman, systemctl, quadlet_dir);
        if args.podman_cgroup.is_some() {
            c.podman_cgroup = args.podman_cgroup;
        }
        if let Some(v) = args.podman_version {
            c.podman_version = Some(v.to_string());
        }
        if !args.podman_args.is_empty() {
            c.podman_args = args.podman_args;
        }
        Ok(c)
    }

    /// How the agent runs podman and systemctl.
    pub fn exec(&self) -> crate::exec::ExecConfig {
        crate::exec::ExecConfig {
            podman: self.podman.clone(),
            podman_args: self.podman_args.clone(),
            systemctl: self.systemctl.clone(),
            podman_cgroup: self.podman_cgroup.clone(),
            timeout: self.exec_timeout.0,
        }
    }

    pub fn load(path: &Path) -> Result<Config, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        serde_yaml::from_str(&text).map_err(|source| Error::Parse { path: path.into(), source })
    }
}
