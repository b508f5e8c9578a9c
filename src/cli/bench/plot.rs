//! `--plot FILE.svg`: IOPS (left) and p99 latency (right) per test, one bar
//! per target, side by side. Both axes are logarithmic: 1 MiB tests run at
//! a hundredth of the IOPS of 4 KiB ones, and a ratio reads as the same gap
//! whatever the test.
//!
//! plotters is built with its SVG backend only: no font files or system
//! libraries, text is left to whatever renders the SVG.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::Report;

/// Wide enough for the longest test name under each group of bars.
const WIDTH: u32 = 1600;
const HEIGHT: u32 = 560;
/// Bar colours of target A and B.
const COLOURS: [RGBColor; 2] = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e)];

/// One target's bars in one panel.
struct Series {
    label: String,
    colour: RGBColor,
    values: Vec<f64>,
}

pub fn draw(path: &Path, report: &Report) -> Result<()> {
    let Some(first) = report.targets.first() else { return Err(anyhow!("no results to plot")) };
    let tests: Vec<&str> = first.results.iter().map(|r| r.test).collect();
    let series = |metric: fn(&super::report::TestResult) -> f64| -> Vec<Series> {
        report
            .targets
            .iter()
            .zip(COLOURS)
            .map(|(t, colour)| Series {
                label: format!("{}: {}", t.label, t.uri),
                colour,
                values: tests
                    .iter()
                    .map(|name| t.results.iter().find(|r| r.test == *name).map_or(0.0, metric))
                    .collect(),
            })
            .collect()
    };
    let iops = series(|r| r.iops);
    let p99 = series(|r| r.p99_us);

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "ballast bench — {} suite, {} engine, {}s per test, {} MiB, {} connection(s)",
        report.suite,
        report.engine,
        report.runtime_s,
        report.size >> 20,
        report.connections
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(plot_err)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    panel(&left, "IOPS (higher is better)", "IOPS", &tests, &iops)?;
    panel(&right, "p99 latency (lower is better)", "p99 latency, µs", &tests, &p99)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e}")
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    tests: &[&str],
    series: &[Series],
) -> Result<()> {
    let positive = || series.iter().flat_map(|s| s.values.iter().copied()).filter(|v| *v > 0.0);
    // A decade below the smallest bar keeps every bar visible on the log
    // axis, room above the tallest keeps the legend off the bars; an empty
    // panel still gets a sane range.
    let max = positive().fold(1.0f64, f64::max) * 6.0;
    let min = (positive().fold(max, f64::min) / 10.0).max(0.01);
    let n = tests.len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, (min..max).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Over a width of n, n labels fall on the integers: one per test,
        // named; any other tick plotters picks stays blank.
        .x_labels(n)
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            tests.get(i as usize).map_or_else(String::new, |t| t.to_string())
        })
        .y_desc(y_desc)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(plot_err)?;

    let width = 0.8 / series.len().max(1) as f64;
    for (k, s) in series.iter().enumerate() {
        let colour = s.colour;
        chart
            .draw_series(s.values.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| {
                let x0 = i as f64 - 0.4 + k as f64 * width;
                Rectangle::new([(x0, min), (x0 + width * 0.92, *v)], colour.filled())
            }))
            .map_err(plot_err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}
