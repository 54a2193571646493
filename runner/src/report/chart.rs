//! SVG charts for the Markdown report, drawn without a browser: the tick scaling curve (agent
//! beside raw podman, by installed apps) and the latency distribution (CDF) of each scenario.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::report::{Report, ScenarioReport};

const SIZE: (u32, u32) = (640, 360);

/// A named line: its points and colour.
type Series<S> = (S, Vec<(f64, f64)>, RGBColor);

/// The charts of one scenario: (file name, SVG text).
fn charts(scenario: &ScenarioReport) -> Result<Vec<(String, String)>> {
    let id = &scenario.label();
    let mut out = Vec::new();
    // name -> p50 of `<prefix>_NNapps`, by app count.
    let curve = |prefix: &str| -> Vec<(f64, f64)> {
        let mut pts: Vec<(f64, f64)> = scenario
            .kpis
            .iter()
            .filter_map(|k| {
                let n = k.name.strip_prefix(prefix)?.strip_suffix("apps")?.parse().ok()?;
                Some((n, k.p50? * 1e3))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts
    };
    let (agent, raw) = (curve("tick_seconds_"), curve("raw_ps_seconds_"));
    if agent.len() >= 2 {
        let series = [("agent no-op tick p50", agent, BLUE), ("raw podman ps p50", raw, RED)];
        out.push((
            format!("{id}-scaling.svg"),
            lines(&format!("{id}: tick cost by installed apps"), "apps", "ms", &series)?,
        ));
    }
    // Latency distributions: every seconds KPI with a few samples, as a CDF in ms.
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let cdfs: Vec<Series<&str>> = scenario
        .kpis
        .iter()
        .filter(|k| k.unit == "s" && k.samples.len() >= 3)
        .filter(|k| !k.name.contains("apps")) // on the curve
        .zip(palette.iter().cycle())
        .map(|(k, color)| {
            let mut v = k.samples.clone();
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let pts = v.iter().enumerate().map(|(i, x)| (x * 1e3, (i + 1) as f64 / n)).collect();
            (k.name.as_str(), pts, *color)
        })
        .collect();
    if !cdfs.is_empty() {
        out.push((
            format!("{id}-latency.svg"),
            lines(&format!("{id}: latency distribution"), "ms", "fraction of samples", &cdfs)?,
        ));
    }
    Ok(out)
}

fn lines<S: AsRef<str>>(title: &str, x: &str, y: &str, series: &[Series<S>]) -> Result<String> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {title}: {e}");
    let all = series.iter().flat_map(|s| s.1.iter());
    let xmax = all.clone().map(|p| p.0).fold(0.0, f64::max) * 1.05 + f64::EPSILON;
    let ymax = all.map(|p| p.1).fold(0.0, f64::max) * 1.1 + f64::EPSILON;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc(x).y_desc(y).draw().map_err(|e| err(&e))?;
        for (name, pts, color) in series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_ref())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// Writes every chart of a run report as an SVG file in `FILE-charts/` beside the Markdown
/// file `md`, and returns the Markdown that shows them. Links are relative, not `data:` URIs,
/// which many renderers (the big forges' among them) drop.
pub fn write(report: &Report, md: &Path) -> Result<String> {
    let stem = md.file_stem().and_then(|s| s.to_str()).context("--out names no file")?;
    let dir_name = format!("{stem}-charts");
    let dir = md.with_file_name(&dir_name);
    let mut out = String::new();
    for node in &report.nodes {
        // Several nodes run the same scenarios: their files must not overwrite each other.
        let prefix =
            if report.nodes.len() > 1 { format!("{}-", file_safe(&node.node)) } else { String::new() };
        for sc in &node.scenarios {
            for (name, svg) in charts(sc)? {
                let name = format!("{prefix}{}", file_safe(&name));
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(&name);
                std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
                out.push_str(&format!("\n![{name}]({})\n", url_path(&format!("{dir_name}/{name}"))));
            }
        }
    }
    if !out.is_empty() {
        out.insert_str(0, "\n## Charts\n");
    }
    Ok(out)
}

/// `ssh://archy@10.0.0.2` -> `ssh___archy_10.0.0.2`: a file name on any system.
fn file_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' }).collect()
}

/// A relative path as a link destination: bytes a URL cannot hold as they are (a space in
/// the user's file name) percent-encoded.
fn url_path(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
