//! The runner's YAML files (scenarios, suites, inventories, SSH commands): read and parsed
//! strictly, every error naming the file (and the line, where serde knows it).

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
