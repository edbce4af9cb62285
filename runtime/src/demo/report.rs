//! What the demo measured: one record a second, the totals, the story's events, the
//! verdict, and the files (`--json`, `--plot` as SVG drawn with `plotters`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde::Serialize;

use super::DemoError;

/// One second of the story.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Second {
    /// Seconds since the story began (the end of this second).
    pub t: u64,
    pub replicas: u32,
    pub budget: f64,
    /// Requests the sink received during this second.
    pub observed_rate: f64,
    /// The most requests the sink held at once during this second.
    pub in_flight: u32,
    /// Produced and not yet delivered.
    pub lag: u64,
    /// Each replica's granted rate at the end of the second.
    pub grants: BTreeMap<String, f64>,
    /// Each replica's acknowledged messages during the second.
    pub per_replica: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Totals {
    pub produced: u64,
    pub delivered: u64,
    pub duplicates: u64,
}

/// Something the story did, at `t` seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t: f64,
    pub what: String,
}

/// The checks the demo's exit code rests on.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// The busiest window of `1 s - 20 ms` starting at an arrival, its bound (1.02 x the
    /// budget in force + one burst per replica) and where it starts (s).
    pub worst_window: usize,
    pub worst_bound: usize,
    pub worst_at: f64,
    pub max_in_flight: u32,
    pub in_flight_budget: u32,
    pub lost: u64,
    /// Deliveries beyond the first: only a SIGKILLed replica may cause them.
    pub duplicates: u64,
    pub duplicate_bound: u64,
    /// Duplicates by the partition each order was produced to.
    pub duplicates_by_partition: Vec<u64>,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: Vec<Second>,
    pub totals: Totals,
    pub events: Vec<Event>,
    pub verdict: Verdict,
}

/// What was in force from an instant on: the budget's rate and the live replicas.
#[derive(Debug, Clone, Copy)]
pub struct InForce {
    pub from: Instant,
    pub rate: f64,
    pub replicas: usize,
}

/// The windows are this much shorter than a second: the delay from a rate permit to
/// the arrival at the sink varies by a few milliseconds, and a whole second would count
/// that variation as an excess.
pub const SLACK: Duration = Duration::from_millis(20);

/// The busiest window of `1 s - SLACK` starting at an arrival from `from` on, against
/// the highest bound in force during it: `(count, bound, start)`.
pub fn worst_window(
    arrivals: &[Instant],
    from: Instant,
    timeline: &[InForce],
) -> (usize, usize, Instant) {
    let len = Duration::from_secs(1) - SLACK;
    let bound = |a: Instant| {
        let mut rate: f64 = 0.0;
        let mut replicas = 0;
        for (i, f) in timeline.iter().enumerate() {
            let to = timeline.get(i + 1).map(|n| n.from);
            if f.from < a + len && to.is_none_or(|t| t > a) {
                rate = rate.max(f.rate);
                replicas = replicas.max(f.replicas);
            }
        }
        (1.02 * rate).floor() as usize + replicas
    };
    let mut worst = (0, usize::MAX, from);
    let mut worst_ratio = 0.0;
    for (i, a) in arrivals.iter().enumerate().filter(|(_, a)| **a >= from) {
        let n = arrivals[i..].partition_point(|t| *t < *a + len);
        let b = bound(*a);
        let ratio = n as f64 / b.max(1) as f64;
        if ratio > worst_ratio {
            worst_ratio = ratio;
            worst = (n, b, *a);
        }
    }
    worst
}

pub fn write_json(path: &Path, report: &Report) -> Result<(), DemoError> {
    let text = serde_json::to_string_pretty(report).unwrap_or_default();
    std::fs::write(path, text).map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Aggregate and per-replica rates against the budget, the story's events marked.
pub fn write_svg(path: &Path, report: &Report) -> Result<(), DemoError> {
    draw(path, report).map_err(|e| DemoError::Plot {
        path: path.to_path_buf(),
        error: e.to_string(),
    })
}

fn draw(path: &Path, report: &Report) -> Result<(), Box<dyn std::error::Error>> {
    let s = &report.seconds;
    let t_max = s.last().map_or(1.0, |x| x.t as f64);
    let y_max = s
        .iter()
        .map(|x| x.budget.max(x.observed_rate))
        .fold(1.0, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "pacer demo: messages per second at the sink",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the story began")
        .y_desc("messages per second")
        .draw()?;
    let members: std::collections::BTreeSet<&String> =
        s.iter().flat_map(|x| x.per_replica.keys()).collect();
    for (i, m) in members.iter().enumerate() {
        let color = Palette99::pick(i + 2).mix(0.7);
        let points = s
            .iter()
            .filter_map(|x| x.per_replica.get(*m).map(|r| (x.t as f64, *r)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(1)))?
            .label(format!("{m} (acked)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    // The budget as a step: each second's value holds over that second.
    let steps = s
        .iter()
        .flat_map(|x| [((x.t - 1) as f64, x.budget), (x.t as f64, x.budget)]);
    chart
        .draw_series(LineSeries::new(steps, RED.stroke_width(3)))?
        .label("budget")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(3)));
    let observed = s.iter().map(|x| (x.t as f64, x.observed_rate));
    chart
        .draw_series(LineSeries::new(observed, BLUE.stroke_width(3)))?
        .label("at the sink, all replicas")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(3)));
    for (i, e) in report.events.iter().enumerate() {
        let line = vec![(e.t, 0.0), (e.t, y_max)];
        chart.draw_series(LineSeries::new(line, BLACK.mix(0.35)))?;
        // Labels alternate between two heights so neighbours do not overlap.
        let y = y_max * if i % 2 == 0 { 0.96 } else { 0.90 };
        chart.draw_series(std::iter::once(Text::new(
            e.what.clone(),
            (e.t + 0.3, y),
            ("sans-serif", 13),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_window_is_judged_against_the_highest_budget_in_force_during_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 10/s then 5/s from 2 s on, 1 replica: bounds 11 and 6.
        let timeline = [
            InForce {
                from: t0,
                rate: 10.0,
                replicas: 1,
            },
            InForce {
                from: at(2000),
                rate: 5.0,
                replicas: 1,
            },
        ];
        // 7 arrivals within 100 ms at 3 s: above the 5/s bound (6).
        let arrivals: Vec<Instant> = (0..7).map(|i| at(3000 + i * 10)).collect();
        let (n, bound, start) = worst_window(&arrivals, t0, &timeline);
        assert_eq!((n, bound, start), (7, 6, at(3000)));
        // The same burst at 1.5 s overlaps the 10/s span: within its bound (11).
        let early: Vec<Instant> = (0..7).map(|i| at(1500 + i * 10)).collect();
        let (n, bound, _) = worst_window(&early, t0, &timeline);
        assert_eq!((n, bound), (7, 11));
    }
}
