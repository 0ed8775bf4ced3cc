//! The benchmark's plot: throughput against prefetch for the worker and the
//! relay at each latency, with the Little's-law line (prefetch ÷ latency)
//! for the non-zero latencies.

use super::BenchReport;
use plotters::prelude::*;
use std::path::Path;

/// Writes the SVG.
pub fn write_svg(report: &BenchReport, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let prefetches: Vec<f64> = report
        .results
        .iter()
        .map(|r| f64::from(r.prefetch))
        .collect();
    let x_min = prefetches
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let x_max = prefetches
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(x_min * 2.0);
    let y_max = report
        .results
        .iter()
        .flat_map(|r| [r.worker.msgs_per_sec, r.relay.msgs_per_sec])
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("refund-worker throughput ({})", report.machine),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("prefetch")
        .y_desc("messages / second")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut latencies: Vec<u64> = report.results.iter().map(|r| r.latency_ms).collect();
    latencies.dedup();
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, latency) in latencies.iter().enumerate() {
        let color = palette[i % palette.len()];
        let points = |pick: fn(&super::ConfigResult) -> f64| -> Vec<(f64, f64)> {
            report
                .results
                .iter()
                .filter(|r| r.latency_ms == *latency)
                .map(|r| (f64::from(r.prefetch), pick(r)))
                .collect()
        };
        let worker = points(|r| r.worker.msgs_per_sec);
        let relay = points(|r| r.relay.msgs_per_sec);
        chart
            .draw_series(LineSeries::new(worker.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("worker, {latency} ms"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(worker.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let dashed = color.mix(0.5).stroke_width(2);
        chart
            .draw_series(LineSeries::new(relay, dashed))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(format!("relay, {latency} ms"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], dashed));
        if *latency > 0 {
            let secs = *latency as f64 / 1000.0;
            let line: Vec<(f64, f64)> = [x_min * 0.8, x_max * 1.25]
                .iter()
                .map(|p| (*p, (p / secs).min(y_max)))
                .collect();
            let thin = color.mix(0.3).stroke_width(1);
            chart
                .draw_series(LineSeries::new(line, thin))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("prefetch / {latency} ms (Little's law)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], thin));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
