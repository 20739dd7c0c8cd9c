//! `--report DIR`: what a run leaves behind besides its summary line. While a scenario
//! runs, what it measures (each latency sample, each completed operation, each shed or
//! refused one) is also counted here, per second; when it ends, DIR receives:
//!
//! - `summary.json`: the scenario's JSON summary (the line `--json` prints);
//! - `series.json` and `series.csv`: one row per second (`t_s`, `count`, `per_s`, `p50_us`,
//!   `p90_us`, `p99_us`, `max_us`, `shed`: offered and not arrived by then, `refused`);
//! - `latency.hlog`: the per-second latency histograms as an HdrHistogram interval log
//!   (compressed V2, microseconds), for HdrHistogram's own tools;
//! - `latency_over_time.svg`, `throughput.svg`, `latency_distribution.svg` (plotters).
//!
//! Samples go to one of a few striped intervals (a lock each, the stripe fixed per
//! thread), so recording from many tasks costs an uncontended lock per call; a ticker
//! swaps the intervals out every second. Nothing is recorded without `--report`.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use hdrhistogram::Histogram;

/// Where latency samples are kept: two significant digits, sized to the largest sample
/// (a report keeps one per second until the run ends: about 14 KiB each for latencies up to
/// a second, some 50 MB for an hour's run; the scenarios' own summaries keep three digits).
fn histogram() -> Histogram<u64> {
    Histogram::new(2).expect("constant precision is valid")
}

/// Stripes of the current second: more than the loadgen's runtime threads on most hosts.
const STRIPES: usize = 16;

#[derive(Debug)]
struct Interval {
    latency_us: Histogram<u64>,
    count: u64,
    /// Messages that should have arrived (sent times receivers), and those that did: their
    /// difference is the second's shed.
    offered: u64,
    arrived: u64,
    refused: u64,
}

impl Interval {
    fn new() -> Self {
        Interval {
            latency_us: histogram(),
            count: 0,
            offered: 0,
            arrived: 0,
            refused: 0,
        }
    }

    fn absorb(&mut self, other: &Interval) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        self.count += other.count;
        self.offered += other.offered;
        self.arrived += other.arrived;
        self.refused += other.refused;
    }
}

/// One second of a run.
#[derive(Debug)]
struct Second {
    /// Its end, from the start of the run.
    at: Duration,
    /// Its length (the last one is usually shorter).
    length: Duration,
    interval: Interval,
}

#[derive(Debug)]
struct Recorder {
    dir: PathBuf,
    started: Instant,
    started_wall: SystemTime,
    stripes: Vec<Mutex<Interval>>,
    seconds: Mutex<Vec<Second>>,
    /// What the scenario counts and what its latency is, for the plots.
    labels: Mutex<(String, String)>,
    summary: Mutex<Option<serde_json::Value>>,
    /// Operations a scenario places afterwards, at the instant they happened, each with its
    /// latency (µs) if it has one (see [`at`]).
    placed: Mutex<Vec<(Instant, Option<u64>)>>,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: Cell<usize> = Cell::new(NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES);
}

/// Adds to the current second, when a report was asked for.
fn with_interval(update: impl FnOnce(&mut Interval)) {
    let Some(recorder) = RECORDER.get() else {
        return;
    };
    let stripe = STRIPE.with(Cell::get);
    // A poisoned lock only held counts: go on with them.
    let mut interval = recorder.stripes[stripe]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    update(&mut interval);
}

/// Whether a report is being recorded.
pub fn enabled() -> bool {
    RECORDER.get().is_some()
}

/// One latency sample (µs).
pub fn latency_us(us: u64) {
    with_interval(|i| i.latency_us.saturating_record(us.max(1)));
}

/// Latency samples (µs), under one lock.
pub fn latencies_us(samples: &[u64]) {
    if samples.is_empty() {
        return;
    }
    with_interval(|i| {
        for &us in samples {
            i.latency_us.saturating_record(us.max(1));
        }
    });
}

/// `n` operations completed (deliveries, acknowledgements, jobs, sessions...).
pub fn count(n: u64) {
    with_interval(|i| i.count += n);
}

/// `n` messages sent that should arrive (counting each receiver), for the shed column.
pub fn offered(n: u64) {
    with_interval(|i| i.offered += n);
}

/// `n` of the offered messages arrived. A second's shed is what was offered in it and did
/// not arrive in it (frames in flight at a second's edge arrive in the next one).
pub fn arrived(n: u64) {
    with_interval(|i| i.arrived += n);
}

/// `n` operations refused by the router.
pub fn refused(n: u64) {
    with_interval(|i| i.refused += n);
}

/// One operation that completed at `at` (with its latency in µs, if it has one), for
/// scenarios that learn when things happened only once they look back (a watcher's log):
/// counted in the second `at` fell in.
pub fn at(at: Instant, latency_us: Option<u64>) {
    if let Some(recorder) = RECORDER.get() {
        recorder
            .placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, latency_us));
    }
}

/// What the scenario's count and latency are, e.g. ("deliveries", "publish -> delivery").
pub fn describe(count: &str, latency: &str) {
    if let Some(recorder) = RECORDER.get() {
        *recorder.labels.lock().unwrap_or_else(|p| p.into_inner()) =
            (count.to_owned(), latency.to_owned());
    }
}

/// The scenario's JSON summary (its last stdout line with `--json`).
pub fn summary(summary: &serde_json::Value) {
    if let Some(recorder) = RECORDER.get() {
        *recorder.summary.lock().unwrap_or_else(|p| p.into_inner()) = Some(summary.clone());
    }
}

/// Starts recording for a report into `dir` (created if missing), with a ticker on the
/// current runtime that closes a second every second.
pub fn start(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let recorder = Recorder {
        dir: dir.to_owned(),
        started: Instant::now(),
        started_wall: SystemTime::now(),
        stripes: (0..STRIPES).map(|_| Mutex::new(Interval::new())).collect(),
        seconds: Mutex::new(Vec::new()),
        labels: Mutex::new(("operations".into(), "latency".into())),
        summary: Mutex::new(None),
        placed: Mutex::new(Vec::new()),
    };
    if RECORDER.set(recorder).is_err() {
        anyhow::bail!("a report is already being recorded");
    }
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // A late tick makes one long second, not a burst of short ones.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            tick.tick().await;
            close_second();
        }
    });
    Ok(())
}

/// Moves what the stripes hold into a new second.
fn close_second() {
    let Some(recorder) = RECORDER.get() else {
        return;
    };
    // The series first: a tick racing `finish` waits here with the samples still in the
    // stripes, where `finish`'s own close has taken them.
    let mut seconds = recorder.seconds.lock().unwrap_or_else(|p| p.into_inner());
    let mut interval = Interval::new();
    for stripe in &recorder.stripes {
        let mut held = stripe.lock().unwrap_or_else(|p| p.into_inner());
        interval.absorb(&held);
        *held = Interval::new();
    }
    let at = recorder.started.elapsed();
    let before = seconds.last().map_or(Duration::ZERO, |s| s.at);
    seconds.push(Second {
        at,
        length: at.saturating_sub(before),
        interval,
    });
}

/// Ends the recording (if one was started) and writes the report's files.
pub fn finish() -> anyhow::Result<()> {
    let Some(recorder) = RECORDER.get() else {
        return Ok(());
    };
    close_second();
    let mut seconds = recorder.seconds.lock().unwrap_or_else(|p| p.into_inner());
    let placed = std::mem::take(&mut *recorder.placed.lock().unwrap_or_else(|p| p.into_inner()));
    place(&mut seconds, recorder.started, placed);
    let (count_label, latency_label) = recorder
        .labels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let summary = recorder
        .summary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or(serde_json::Value::Null);
    let dir = &recorder.dir;
    let write = |name: &str, text: String| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("summary.json", format!("{summary:#}\n"))?;
    let rows = rows(&seconds);
    write(
        "series.json",
        format!("{:#}\n", serde_json::Value::Array(rows.clone())),
    )?;
    write("series.csv", csv(&rows))?;
    std::fs::write(
        dir.join("latency.hlog"),
        hlog(recorder.started_wall, &seconds)?,
    )
    .with_context(|| format!("writing {}", dir.join("latency.hlog").display()))?;
    let mut whole = histogram();
    for second in seconds.iter() {
        let _ = whole.add(&second.interval.latency_us);
    }
    plot::latency_over_time(&dir.join("latency_over_time.svg"), &rows, &latency_label)?;
    plot::throughput(&dir.join("throughput.svg"), &rows, &count_label)?;
    plot::distribution(
        &dir.join("latency_distribution.svg"),
        &whole,
        &latency_label,
    )?;
    eprintln!("report written to {}", dir.display());
    Ok(())
}

/// Counts each of `placed` in the second it happened in (the last one if it is later).
fn place(seconds: &mut [Second], started: Instant, placed: Vec<(Instant, Option<u64>)>) {
    for (at, latency_us) in placed {
        let since = at.saturating_duration_since(started);
        let index = seconds
            .partition_point(|s| s.at < since)
            .min(seconds.len().saturating_sub(1));
        let Some(second) = seconds.get_mut(index) else {
            continue;
        };
        second.interval.count += 1;
        if let Some(us) = latency_us {
            second.interval.latency_us.saturating_record(us.max(1));
        }
    }
}

/// The series columns, in order.
const COLUMNS: [&str; 9] = [
    "t_s", "count", "per_s", "p50_us", "p90_us", "p99_us", "max_us", "shed", "refused",
];

fn rows(seconds: &[Second]) -> Vec<serde_json::Value> {
    // Offered and not arrived so far: in flight, or lost.
    let mut missing: i64 = 0;
    seconds
        .iter()
        .map(|second| {
            missing += second.interval.offered as i64 - second.interval.arrived as i64;
            let i = &second.interval;
            let q = |q: f64| {
                if i.latency_us.is_empty() {
                    0
                } else {
                    i.latency_us.value_at_quantile(q)
                }
            };
            let length = second.length.as_secs_f64().max(1e-3);
            serde_json::json!({
                "t_s": (second.at.as_secs_f64() * 1e3).round() / 1e3,
                "count": i.count,
                "per_s": (i.count as f64 / length).round(),
                "p50_us": q(0.5),
                "p90_us": q(0.9),
                "p99_us": q(0.99),
                "max_us": i.latency_us.max(),
                "shed": missing.max(0),
                "refused": i.refused,
            })
        })
        .collect()
}

fn csv(rows: &[serde_json::Value]) -> String {
    let mut text = COLUMNS.join(",");
    text.push('\n');
    for row in rows {
        let cells: Vec<String> = COLUMNS.iter().map(|c| row[*c].to_string()).collect();
        text.push_str(&cells.join(","));
        text.push('\n');
    }
    text
}

fn hlog(started: SystemTime, seconds: &[Second]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut serializer = hdrhistogram::serialization::V2DeflateSerializer::new();
    let mut builder = hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder::new();
    builder
        .add_comment("swarmbus-loadgen --report: latency per second, microseconds")
        .with_start_time(started)
        .with_base_time(started);
    let mut log = builder.begin_log_with(&mut out, &mut serializer)?;
    for second in seconds {
        let start = second.at.saturating_sub(second.length);
        log.write_histogram(&second.interval.latency_us, start, second.length, None)
            .map_err(|e| anyhow::anyhow!("writing the interval log: {e:?}"))?;
    }
    Ok(out)
}

mod plot {
    //! The SVG plots (plotters' SVG backend: text is left to the viewer's fonts).

    use std::path::Path;

    use hdrhistogram::Histogram;
    use plotters::prelude::*;

    const SIZE: (u32, u32) = (960, 540);

    fn failed(error: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("drawing a plot: {error}")
    }

    fn column(rows: &[serde_json::Value], name: &str) -> Vec<(f64, f64)> {
        rows.iter()
            .map(|r| {
                (
                    r["t_s"].as_f64().unwrap_or_default(),
                    r[name].as_f64().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// p50, p90, p99 and max per second, on a log scale.
    pub fn latency_over_time(
        path: &Path,
        rows: &[serde_json::Value],
        what: &str,
    ) -> anyhow::Result<()> {
        let percentiles = [
            ("p50", "p50_us", BLUE),
            ("p90", "p90_us", GREEN),
            ("p99", "p99_us", RED),
            ("max", "max_us", BLACK),
        ];
        let series: Vec<_> = percentiles
            .iter()
            .map(|(label, name, color)| {
                // A second without samples has no percentile: left out, not drawn at 0.
                let points: Vec<(f64, f64)> = column(rows, name)
                    .into_iter()
                    .filter(|(_, v)| *v > 0.0)
                    .collect();
                (*label, points, *color)
            })
            .collect();
        let t_max = rows
            .last()
            .and_then(|r| r["t_s"].as_f64())
            .unwrap_or(1.0)
            .max(1.0);
        let y_max = series
            .iter()
            .flat_map(|(_, p, _)| p.iter().map(|(_, v)| *v))
            .fold(10.0f64, f64::max)
            * 1.5;
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{what}: percentiles per second"),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..t_max, (1.0..y_max).log_scale())
            .map_err(failed)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the start")
            .y_desc("microseconds")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(failed)?;
        lines(&mut chart, series)?;
        root.present().map_err(failed)
    }

    /// A line to draw: its legend, its points, its color.
    type Line<'l> = (&'l str, Vec<(f64, f64)>, RGBColor);

    /// Draws each line, and their legend.
    fn lines<'a, DB, CT>(
        chart: &mut ChartContext<'a, DB, CT>,
        series: Vec<Line>,
    ) -> anyhow::Result<()>
    where
        DB: DrawingBackend + 'a,
        DB::ErrorType: 'static,
        CT: CoordTranslate<From = (f64, f64)>,
    {
        for (label, points, color) in series {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(failed)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(failed)
    }

    /// Completed and refused operations per second, and what has not arrived so far.
    pub fn throughput(path: &Path, rows: &[serde_json::Value], what: &str) -> anyhow::Result<()> {
        let per_s = column(rows, "per_s");
        // Refusals as a rate, like the operations (the last row is shorter); shed is what
        // has not arrived so far, a level.
        let mut previous = 0.0;
        let refused: Vec<(f64, f64)> = column(rows, "refused")
            .into_iter()
            .map(|(t, n)| {
                let length = (t - previous).max(1e-3);
                previous = t;
                (t, n / length)
            })
            .collect();
        let shed = column(rows, "shed");
        let t_max = per_s.last().map_or(1.0, |(t, _)| *t).max(1.0);
        let y_max = per_s
            .iter()
            .chain(&shed)
            .chain(&refused)
            .map(|(_, v)| *v)
            .fold(1.0f64, f64::max)
            * 1.1;
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{what} per second"), ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(88)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(failed)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the start")
            .y_desc("per second")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(failed)?;
        let series = vec![
            (what, per_s, BLUE),
            ("not arrived so far (shed or in flight)", shed, RED),
            ("refused per second", refused, MAGENTA),
        ];
        lines(&mut chart, series)?;
        root.present().map_err(failed)
    }

    /// `nines` (1: 90%, 3: 99.9%) as a percentage without trailing zeros.
    pub fn percent_label(nines: f64) -> String {
        let percent = format!("{:.4}", 100.0 * (1.0 - 10f64.powf(-nines)));
        format!("{}%", percent.trim_end_matches('0').trim_end_matches('.'))
    }

    /// The whole run's latency by percentile, the percentiles spread as HdrHistogram's
    /// plots spread them: x is the number of nines (1 = 90%, 2 = 99%, 3 = 99.9%).
    pub fn distribution(path: &Path, whole: &Histogram<u64>, what: &str) -> anyhow::Result<()> {
        let mut points = Vec::new();
        if !whole.is_empty() {
            // 0 to 5 nines in small steps (50% sits at about 0.3).
            for step in 0..=100 {
                let nines = f64::from(step) * 0.05;
                let quantile = 1.0 - 10f64.powf(-nines);
                points.push((nines, whole.value_at_quantile(quantile) as f64));
            }
        }
        let y_max = points.iter().map(|(_, v)| *v).fold(10.0f64, f64::max) * 1.5;
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(failed)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{what}: distribution over the run"),
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..5.0, (1.0..y_max).log_scale())
            .map_err(failed)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("microseconds")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_labels(6)
            .x_label_formatter(&|nines| percent_label(*nines))
            .draw()
            .map_err(failed)?;
        chart
            .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
            .map_err(failed)?;
        root.present().map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(at_s: u64, count: u64, samples: &[u64]) -> Second {
        let mut interval = Interval::new();
        interval.count = count;
        interval.offered = 3;
        interval.arrived = 2;
        for &us in samples {
            interval.latency_us.record(us).unwrap();
        }
        Second {
            at: Duration::from_secs(at_s),
            length: Duration::from_secs(1),
            interval,
        }
    }

    #[test]
    fn rows_and_csv_hold_each_second() {
        let seconds = [second(1, 10, &[100, 200, 300]), second(2, 0, &[])];
        let rows = rows(&seconds);
        assert_eq!(rows[0]["count"], 10);
        assert_eq!(rows[0]["per_s"], 10.0);
        assert_eq!(rows[0]["max_us"].as_u64().unwrap() / 10, 30);
        assert_eq!(rows[1]["p99_us"], 0, "no samples: 0, not a panic");
        // Each second offered 3 and 2 arrived: what has not arrived builds up.
        assert_eq!((&rows[0]["shed"], &rows[1]["shed"]), (&1.into(), &2.into()));
        let text = csv(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], COLUMNS.join(","));
        assert!(lines[1].starts_with("1.0,10,10.0,"), "{}", lines[1]);
    }

    #[test]
    fn the_interval_log_holds_one_histogram_per_second() {
        let seconds = [second(1, 10, &[100, 2_000]), second(2, 5, &[50])];
        let log = hlog(SystemTime::now(), &seconds).unwrap();
        let text = String::from_utf8(log.clone()).unwrap();
        assert!(text.starts_with("#swarmbus-loadgen"), "{text}");
        let intervals: Vec<_> =
            hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log)
                .filter_map(|entry| match entry {
                    Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(h)) => Some(h),
                    _ => None,
                })
                .collect();
        assert_eq!(intervals.len(), 2);
        assert_eq!(intervals[1].start_timestamp(), Duration::from_secs(1));
        assert_eq!(intervals[0].duration(), Duration::from_secs(1));
    }

    #[test]
    fn placed_operations_count_in_the_second_they_happened() {
        let mut seconds = [second(1, 0, &[]), second(2, 0, &[]), second(3, 0, &[])];
        let started = Instant::now();
        let placed = vec![
            (started + Duration::from_millis(1_500), Some(700)),
            (started + Duration::from_millis(1_600), None),
            (started + Duration::from_secs(9), None), // past the end: the last second
        ];
        place(&mut seconds, started, placed);
        let counts: Vec<u64> = seconds.iter().map(|s| s.interval.count).collect();
        assert_eq!(counts, [0, 2, 1]);
        assert_eq!(seconds[1].interval.latency_us.len(), 1);
    }

    #[test]
    fn percentile_labels_read_as_percentages() {
        assert_eq!(plot::percent_label(0.0), "0%");
        assert_eq!(plot::percent_label(1.0), "90%");
        assert_eq!(plot::percent_label(3.0), "99.9%");
    }

    #[test]
    fn plots_are_svg_documents_even_without_samples() {
        let dir = tempfile::tempdir().unwrap();
        let seconds = [second(1, 10, &[100, 2_000]), second(2, 5, &[50])];
        let rows = rows(&seconds);
        let mut whole = histogram();
        for s in &seconds {
            whole.add(&s.interval.latency_us).unwrap();
        }
        let over_time = dir.path().join("a.svg");
        plot::latency_over_time(&over_time, &rows, "delivery").unwrap();
        plot::throughput(&dir.path().join("b.svg"), &rows, "deliveries").unwrap();
        plot::distribution(&dir.path().join("c.svg"), &whole, "delivery").unwrap();
        plot::distribution(&dir.path().join("d.svg"), &histogram(), "nothing").unwrap();
        for name in ["a.svg", "b.svg", "c.svg", "d.svg"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(
                text.starts_with("<svg"),
                "{name}: {}",
                &text[..40.min(text.len())]
            );
            assert!(text.trim_end().ends_with("</svg>"), "{name}");
        }
        let text = std::fs::read_to_string(over_time).unwrap();
        assert!(text.contains("p99"), "the legend names the lines");
        assert!(text.contains("<polyline"), "the lines are drawn");
    }
}
