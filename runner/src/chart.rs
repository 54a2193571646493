//! SVG charts for the Markdown report, drawn without a browser: the tick scaling curve (agent
//! beside raw podman, by installed apps) and the latency distribution (CDF) of each scenario.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;

const SIZE: (u32, u32) = (640, 360);

/// A named line: its points and colour.
type Series<S> = (S, Vec<(f64, f64)>, RGBColor);

/// The charts of one scenario: (file name, SVG text).
pub fn charts(scenario: &Value) -> Result<Vec<(String, String)>> {
    let id = scenario["scenario"].as_str().unwrap_or("scenario");
    let kpis: Vec<&Value> = scenario["kpis"].as_array().into_iter().flatten().collect();
    let mut out = Vec::new();
    // name -> p50 of `<prefix>_NNapps`, by app count.
    let curve = |prefix: &str| -> Vec<(f64, f64)> {
        let mut pts: Vec<(f64, f64)> = kpis
            .iter()
            .filter_map(|k| {
                let n = k["name"].as_str()?.strip_prefix(prefix)?.strip_suffix("apps")?.parse().ok()?;
                Some((n, k["p50"].as_f64()? * 1e3))
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
    let cdfs: Vec<Series<&str>> = kpis
        .iter()
        .filter(|k| k["unit"] == "s" && k["samples"].as_array().is_some_and(|s| s.len() >= 3))
        .filter(|k| !k["name"].as_str().unwrap_or_default().contains("apps")) // on the curve
        .zip(palette.iter().cycle())
        .map(|(k, color)| {
            let mut v: Vec<f64> =
                k["samples"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len() as f64;
            let pts = v.iter().enumerate().map(|(i, x)| (x * 1e3, (i + 1) as f64 / n)).collect();
            (k["name"].as_str().unwrap_or_default(), pts, *color)
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

/// Every chart of a run report as Markdown images with the SVG inline (a data URI), so the
/// report stays one self-contained file.
pub fn markdown(report: &Value) -> Result<String> {
    use base64::Engine;
    let mut out = String::new();
    for sc in report["scenarios"].as_array().into_iter().flatten() {
        for (name, svg) in charts(sc)? {
            let data = base64::engine::general_purpose::STANDARD.encode(svg);
            out.push_str(&format!("\n![{name}](data:image/svg+xml;base64,{data})\n"));
        }
    }
    if !out.is_empty() {
        out.insert_str(0, "\n## Charts\n");
    }
    Ok(out)
}
