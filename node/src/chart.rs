//! The forecast-vs-actual chart of the demo: one panel per model with the
//! actual closes of the test split, the model's one-step-ahead
//! predictions over it, and the recursive forecast after the last bar.

use std::path::Path;

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use chrono_tz::America::New_York;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One panel's data.
pub struct Panel {
    pub title: String,
    /// (time, actual close, one-step-ahead prediction) over the test split.
    pub validation: Vec<(DateTime<Utc>, f64, f64)>,
    /// (time, forecast close) after the last bar.
    pub forecast: Vec<(DateTime<Utc>, f64)>,
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Draws the panels into a PNG at `path`.
pub fn draw(path: &Path, panels: &[Panel]) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is invalid"))?;
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (800 * cols as u32, 420 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((rows, cols));
    for (panel, area) in panels.iter().zip(areas) {
        // x axis: point index (bars are irregular in time: nights, weekends).
        let times: Vec<DateTime<Utc>> = panel
            .validation
            .iter()
            .map(|v| v.0)
            .chain(panel.forecast.iter().map(|f| f.0))
            .collect();
        let n = times.len().max(2);
        let ys = panel
            .validation
            .iter()
            .flat_map(|v| [v.1, v.2])
            .chain(panel.forecast.iter().map(|f| f.1));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| {
            (l.min(y), h.max(y))
        });
        let pad = ((hi - lo) * 0.08).max(1e-6);
        // Intraday panels label the New York clock time, daily ones the date.
        let intraday = times
            .windows(2)
            .any(|w| w[1] - w[0] < chrono::Duration::hours(12));
        let label = |x: &f64| {
            times
                .get((*x as usize).min(times.len().saturating_sub(1)))
                .map(|t| {
                    if intraday {
                        t.with_timezone(&New_York).format("%m-%d %H:%M").to_string()
                    } else {
                        t.format("%Y-%m-%d").to_string()
                    }
                })
                .unwrap_or_default()
        };
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..(n - 1) as f64, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&label)
            .y_desc("close")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let nv = panel.validation.len();
        chart
            .draw_series(LineSeries::new(
                panel
                    .validation
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64, v.1)),
                BLACK.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("actual")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                panel
                    .validation
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (i as f64, v.2)),
                BLUE.stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("model, one step ahead")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(1)));
        let last = panel.validation.last().map(|v| ((nv - 1) as f64, v.1));
        chart
            .draw_series(LineSeries::new(
                last.into_iter().chain(
                    panel
                        .forecast
                        .iter()
                        .enumerate()
                        .map(|(i, f)| ((nv + i) as f64, f.1)),
                ),
                RED.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label("forecast")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present()
        .map_err(|e| anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}

/// One line of a [`lines`] chart.
pub struct Line<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub width: u32,
    pub points: Vec<(f64, f64)>,
}

/// A single-panel line chart.
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Line]) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is invalid"))?;
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    draw_lines(&root, title, x_desc, y_desc, series, &[])?;
    root.present()
        .map_err(|e| anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}

/// Draws one line panel into `area`; `marks` are labelled points.
fn draw_lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Line],
    marks: &[(&str, (f64, f64))],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let all = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(marks.iter().map(|m| m.1));
    let (x0, x1, y0, y1) = all.fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), (x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if !(x0.is_finite() && y0.is_finite()) {
        return Err(anyhow!("{title}: nothing to draw"));
    }
    let pad = ((y1 - y0) * 0.1).max(y1.abs() * 1e-4).max(1e-9);
    let decimals = match y1 - y0 {
        r if r >= 10.0 => 1,
        r if r >= 0.1 => 3,
        _ => 5,
    };
    let y_fmt = move |y: &f64| format!("{:.*}", decimals, y);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(((x1 - x0) as usize + 1).clamp(2, 10))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&y_fmt)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for s in series {
        let style = s.color.stroke_width(s.width);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))
            .map_err(|e| anyhow!("{e}"))?
            .label(s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    for (label, p) in marks {
        chart
            .draw_series(std::iter::once(Circle::new(*p, 6, BLACK.filled())))
            .map_err(|e| anyhow!("{e}"))?
            .label(*label)
            .legend(|(x, y)| Circle::new((x + 9, y), 5, BLACK.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// `loss.png`: two panels (their scales differ): train loss per epoch, and
/// validation loss per epoch from epoch 0 (the untrained model) with the
/// kept epoch marked.
pub fn loss_chart(path: &Path, f: &tickmesh_model::fit::Fitted) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is invalid"))?;
    let train: Vec<(f64, f64)> = f
        .history
        .iter()
        .map(|p| (p.epoch as f64, p.train_loss))
        .collect();
    let val: Vec<(f64, f64)> = std::iter::once((0.0, f.initial_val_loss))
        .chain(f.history.iter().map(|p| (p.epoch as f64, p.val_loss)))
        .collect();
    let root = BitMapBackend::new(path, (900, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(360);
    draw_lines(
        &top,
        "train loss (MSE of the standardized next return)",
        "epoch",
        "train loss",
        &[Line {
            label: "train",
            color: BLUE,
            width: 2,
            points: train,
        }],
        &[],
    )?;
    let title = format!(
        "validation loss: best epoch {} of {}{}",
        f.best_epoch,
        f.epochs_run,
        if f.stopped_early {
            ", stopped early"
        } else {
            ""
        }
    );
    draw_lines(
        &bottom,
        &title,
        "epoch (0: untrained)",
        "validation loss",
        &[Line {
            label: "validation",
            color: RED,
            width: 2,
            points: val,
        }],
        &[("kept", (f.best_epoch as f64, f.best_val_loss))],
    )?;
    root.present()
        .map_err(|e| anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}

/// `test.png`: actual closes over the test split, the model's one-step
/// predictions and the naive forecast.
pub fn test_chart(
    path: &Path,
    title: &str,
    points: &[tickmesh_model::fit::TestPoint],
) -> Result<()> {
    let at = |f: fn(&tickmesh_model::fit::TestPoint) -> f64| {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| (i as f64, f(p)))
            .collect::<Vec<_>>()
    };
    lines(
        path,
        title,
        "test window (oldest first)",
        "close",
        &[
            Line {
                label: "actual",
                color: BLACK,
                width: 2,
                points: at(|p| p.actual),
            },
            Line {
                label: "model, one step ahead",
                color: BLUE,
                width: 1,
                points: at(|p| p.predicted),
            },
            Line {
                label: "naive (last close)",
                color: RGBColor(150, 150, 150),
                width: 1,
                points: at(|p| p.naive),
            },
        ],
    )
}
