//! What a step saw: whether its fault took effect, the KPI samples it measured, and the
//! details a person reads in the report. A fault without evidence is `unknown`, never `pass`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The details key of [`Evidence::failed_apps`].
pub const FAILED_APPS: &str = "failed_apps";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// `Some(false)`: the fault demonstrably did not happen, so the iteration proves nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_effect: Option<bool>,
    /// KPI samples, by KPI name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measures: BTreeMap<String, Vec<f64>>,
    /// What was seen (pids, paths, checksums), for people.
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl Evidence {
    /// Evidence with these details (a JSON object; anything else is kept under `value`).
    pub fn of(details: Value) -> Evidence {
        let details = match details {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_string(), other)]),
        };
        Evidence { details, ..Evidence::default() }
    }

    pub fn effect(mut self, took_effect: bool) -> Evidence {
        self.took_effect = Some(took_effect);
        self
    }

    pub fn with(mut self, key: &str, value: impl Serialize) -> Evidence {
        self.details.insert(key.to_string(), serde_json::to_value(value).unwrap_or(Value::Null));
        self
    }

    /// Apps that failed the step while the others went on (a per-app scenario), and why.
    pub fn failed_apps(&self) -> BTreeMap<String, String> {
        self.details.get(FAILED_APPS).and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
    }

    pub fn measure(mut self, kpi: &str, samples: Vec<f64>) -> Evidence {
        self.measures.entry(kpi.to_string()).or_default().extend(samples);
        self
    }
}
