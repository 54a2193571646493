//! The agent's Prometheus metrics. Base units, `_total` counters, histograms for durations
//! with a bucket at each KPI threshold, timestamps rather than ages, and every known label
//! value exported at 0 from the start so that rates and alerts see the series.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::manifest::SecretKind;
use crate::secrets::HealReason;

const PREFIX: &str = "archy_agent";

pub struct Metrics {
    registry: Registry,
    pub tick_duration: Histogram,
    pub ticks: IntCounterVec,
    pub actions: IntCounterVec,
    pub exec_calls: IntCounterVec,
    pub exec_duration: HistogramVec,
    pub install_duration: HistogramVec,
    pub install_steps: HistogramVec,
    pub app_up: IntGaugeVec,
    pub app_desired: IntGaugeVec,
    pub app_restarts: IntCounterVec,
    pub app_error: IntGaugeVec,
    pub secrets_generated: IntCounterVec,
    pub secrets_healed: IntCounterVec,
    pub drift_repairs: IntCounterVec,
    pub orphans_removed: IntCounterVec,
    pub state_recoveries: IntCounterVec,
    pub startup_duration: Gauge,
    pub last_success: Gauge,
    pub build_info: IntGaugeVec,
}

/// The steps of an install, in order, each timed from the end of the one before (`accepted`
/// from the request): the request read by a tick, its secrets ensured, the unit written, the
/// daemon-reload returned, the start returned, the first healthy observation. The podman
/// backend has no unit and no daemon-reload.
pub const INSTALL_STEPS: &[&str] =
    &["accepted", "secrets", "unit_written", "daemon_reload", "started", "healthy"];
/// The install steps only the Quadlet backend has.
pub const QUADLET_ONLY_INSTALL_STEPS: &[&str] = &["unit_written", "daemon_reload"];

/// Drift kinds the reconciler repairs.
pub const DRIFT_KINDS: &[&str] = &["spec", "ports", "unit_file", "image"];
/// Recovery reasons of the state file.
pub const RECOVERY_REASONS: &[&str] = &["corrupt", "unreadable", "missing", "adopted"];

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Metrics {
    pub fn new(backend: &str) -> Metrics {
        let r = Registry::new();
        let counter = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge_vec = |n: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name(n), help), labels).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let gauge = |n: &str, help: &str| {
            let g = Gauge::new(name(n), help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram_vec = |n: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name(n), help).buckets(buckets), labels)
                .expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let tick_duration = Histogram::with_opts(
            HistogramOpts::new(name("reconcile_tick_duration_seconds"), "Duration of one reconcile pass.")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        r.register(Box::new(tick_duration.clone())).expect("unique metric");

        let m = Metrics {
            tick_duration,
            ticks: counter("reconcile_ticks_total", "Reconcile passes by result.", &["result"]),
            actions: counter(
                "actions_total",
                "Actions applied by the reconciler, by kind and result.",
                &["kind", "result"],
            ),
            exec_calls: counter(
                "exec_calls_total",
                "External calls by tool, verb and result.",
                &["tool", "verb", "result"],
            ),
            exec_duration: histogram_vec(
                "exec_duration_seconds",
                "Duration of external calls by tool and verb.",
                &["tool", "verb"],
                vec![0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0],
            ),
            install_duration: histogram_vec(
                "install_duration_seconds",
                "Install latency per app: request accepted to running and healthy.",
                &["app"],
                vec![0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0],
            ),
            install_steps: histogram_vec(
                "install_step_duration_seconds",
                "Install latency by step, each from the end of the step before (see INSTALL_STEPS).",
                &["step"],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0],
            ),
            app_up: gauge_vec(
                "app_up",
                "1 when the app is running and healthy, 0 otherwise (installed apps; see app_desired).",
                &["app"],
            ),
            app_desired: gauge_vec(
                "app_desired",
                "1 on the app's desired state (running, stopped, absent: being uninstalled), 0 on the others.",
                &["app", "state"],
            ),
            app_restarts: counter(
                "app_restarts_total",
                "New containers the agent did not ask for, or asked for after a crash.",
                &["app"],
            ),
            app_error: gauge_vec(
                "app_error",
                "1 when the app has a terminal error the agent does not retry.",
                &["app"],
            ),
            secrets_generated: counter(
                "secrets_generated_total",
                "Secrets created for the first time, by kind.",
                &["kind"],
            ),
            secrets_healed: counter(
                "secrets_healed_total",
                "Secrets recreated because they were damaged, by reason.",
                &["reason"],
            ),
            drift_repairs: counter("drift_repairs_total", "Drift repaired, by kind.", &["kind"]),
            orphans_removed: counter(
                "orphans_removed_total",
                "Orphans removed, by kind (container, unit).",
                &["kind"],
            ),
            state_recoveries: counter(
                "state_recoveries_total",
                "Desired-state recoveries at start-up, by reason.",
                &["reason"],
            ),
            startup_duration: gauge(
                "startup_duration_seconds",
                "Agent start-up: exec to first reconcile pass done.",
            ),
            last_success: gauge(
                "last_successful_reconcile_timestamp_seconds",
                "Unix time of the last successful reconcile pass.",
            ),
            build_info: gauge_vec(
                "build_info",
                "Agent version and backend; always 1.",
                &["version", "backend"],
            ),
            registry: r,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), backend]).set(1);
        for result in ["ok", "error"] {
            m.ticks.with_label_values(&[result]);
        }
        for kind in [SecretKind::Hex16, SecretKind::Hex32, SecretKind::Bcrypt] {
            m.secrets_generated.with_label_values(&[kind.as_str()]);
        }
        for reason in [
            HealReason::Missing,
            HealReason::Empty,
            HealReason::Malformed,
            HealReason::HashMismatch,
            HealReason::WrongMode,
            HealReason::WrongOwner,
        ] {
            m.secrets_healed.with_label_values(&[reason.as_str()]);
        }
        for kind in DRIFT_KINDS {
            m.drift_repairs.with_label_values(&[kind]);
        }
        for kind in ["container", "unit"] {
            m.orphans_removed.with_label_values(&[kind]);
        }
        for step in INSTALL_STEPS {
            m.install_steps.with_label_values(&[step]);
        }
        for reason in RECOVERY_REASONS {
            m.state_recoveries.with_label_values(&[reason]);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry.register(Box::new(pc)).expect("unique metric");
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}
