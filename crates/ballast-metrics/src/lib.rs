//! ballast-metrics: counters, gauges and fixed-bucket histograms with the
//! Prometheus text exposition format, and nothing else.
//!
//! Recording is one or two relaxed atomic adds on a handle obtained once
//! (`Arc<Counter>` etc., usually kept in a `static` or a struct field): no
//! lock, no allocation, no label lookup per observation. Labels are fixed
//! when a series is registered; a family with a label (an NBD op, say) is a
//! small array of handles resolved at registration.
//!
//! A [`Registry`] owns the list of series and renders them; [`global`] is the
//! process-wide one every crate records into and `/metrics` renders.
//! Registering is idempotent: the same name and labels give the same handle,
//! so two components (or two nodes in one test process) share a series.
//!
//! Histograms store observations as integers in a base unit (nanoseconds for
//! [`Unit::Seconds`], plain counts for [`Unit::Count`]) with the buckets kept
//! per bucket, not cumulative; rendering converts to seconds and sums the
//! buckets up, so `_bucket{le=…}` is cumulative and ends with `+Inf` = `_count`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A monotonically increasing count (rendered as a Prometheus `counter`).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (a Prometheus `gauge`).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Self {
        Self(AtomicI64::new(0))
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a histogram's integer observations are, and how they are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Observations in nanoseconds, rendered in seconds.
    Seconds,
    /// Plain counts (batch sizes), rendered as they are.
    Count,
}

impl Unit {
    fn render(self, v: u64) -> f64 {
        match self {
            Unit::Seconds => v as f64 / 1e9,
            Unit::Count => v as f64,
        }
    }
}

/// Latency buckets: 50 µs doubling to about 13 s (19 bounds), in nanoseconds.
pub fn latency_buckets() -> Vec<u64> {
    (0..19).map(|k| 50_000u64 << k).collect()
}

/// Size buckets: 1, 2, 4 … 1024.
pub fn size_buckets() -> Vec<u64> {
    (0..11).map(|k| 1u64 << k).collect()
}

/// A distribution over fixed upper bounds (a Prometheus `histogram`).
#[derive(Debug)]
pub struct Histogram {
    unit: Unit,
    /// Inclusive upper bounds, ascending, in the base unit.
    bounds: Box<[u64]>,
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram over `bounds` (sorted and deduplicated here).
    pub fn new(unit: Unit, bounds: &[u64]) -> Self {
        let mut b = bounds.to_vec();
        b.sort_unstable();
        b.dedup();
        let buckets = (0..=b.len()).map(|_| AtomicU64::new(0)).collect();
        Self { unit, bounds: b.into(), buckets, sum: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    /// Record one observation in the base unit (nanoseconds or a count).
    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a duration (for [`Unit::Seconds`] histograms).
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Record the time since `start`.
    pub fn observe_since(&self, start: Instant) {
        self.observe_duration(start.elapsed());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of observations in the base unit.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }
}

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    series: Vec<(Vec<(String, String)>, Metric)>,
}

/// A set of metric families, rendered in registration order.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::default)
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The series `name{labels}`, created on first use. `name` must be a
    /// valid metric name; a name already registered with another kind gets
    /// a handle that is recorded into but never rendered (a programming
    /// error, caught by the name tests of the crates that register).
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Counter> {
        match self.series(name, help, Kind::Counter, labels, || Metric::Counter(Arc::default())) {
            Some(Metric::Counter(c)) => c,
            _ => Arc::default(),
        }
    }

    /// As [`Registry::counter`], for a gauge.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Gauge> {
        match self.series(name, help, Kind::Gauge, labels, || Metric::Gauge(Arc::default())) {
            Some(Metric::Gauge(g)) => g,
            _ => Arc::default(),
        }
    }

    /// As [`Registry::counter`], for a histogram over `bounds` in `unit`'s
    /// base unit (the bounds of the first registration win).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        unit: Unit,
        bounds: &[u64],
    ) -> Arc<Histogram> {
        let make = || Metric::Histogram(Arc::new(Histogram::new(unit, bounds)));
        match self.series(name, help, Kind::Histogram, labels, make) {
            Some(Metric::Histogram(h)) => h,
            _ => Arc::new(Histogram::new(unit, bounds)),
        }
    }

    fn series(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Metric,
    ) -> Option<Metric> {
        debug_assert!(valid_name(name), "bad metric name {name:?}");
        let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = match families.iter().position(|f| f.name == name) {
            Some(i) => &mut families[i],
            None => {
                families.push(Family { name: name.into(), help: help.into(), kind, series: Vec::new() });
                families.last_mut()?
            }
        };
        if family.kind != kind {
            return None;
        }
        if let Some((_, m)) = family.series.iter().find(|(l, _)| *l == labels) {
            return Some(m.clone());
        }
        let metric = make();
        family.series.push((labels, metric.clone()));
        Some(metric)
    }

    /// Names of the registered families.
    pub fn names(&self) -> Vec<String> {
        self.families.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.name.clone()).collect()
    }

    /// Every family in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    /// [`Registry::render`], appending to `out`.
    pub fn render_into(&self, out: &mut String) {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        for f in families.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
            for (labels, metric) in &f.series {
                match metric {
                    Metric::Counter(c) => sample(out, &f.name, "", labels, None, &c.get().to_string()),
                    Metric::Gauge(g) => sample(out, &f.name, "", labels, None, &g.get().to_string()),
                    Metric::Histogram(h) => render_histogram(out, &f.name, labels, h),
                }
            }
        }
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &[(String, String)], h: &Histogram) {
    let mut cumulative = 0u64;
    for (i, bucket) in h.buckets.iter().enumerate() {
        cumulative += bucket.load(Ordering::Relaxed);
        let le = match h.bounds.get(i) {
            Some(b) => format_f64(h.unit.render(*b)),
            None => "+Inf".to_string(),
        };
        sample(out, name, "_bucket", labels, Some(&le), &cumulative.to_string());
    }
    // The count is the +Inf bucket: a scrape racing an observation still
    // sees `_count` equal to the last bucket.
    sample(out, name, "_sum", labels, None, &format_f64(h.unit.render(h.sum())));
    sample(out, name, "_count", labels, None, &cumulative.to_string());
}

fn sample(out: &mut String, name: &str, suffix: &str, labels: &[(String, String)], le: Option<&str>, value: &str) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        let le_pair = le.map(|v| ("le", v));
        for (k, v) in labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(le_pair) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// A float as Prometheus reads it: integers without a fraction, the rest in
/// Rust's shortest round-trip form.
fn format_f64(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and newline.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// HELP text escapes backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_with_help_type_and_escaped_labels() {
        let r = Registry::new();
        let c = r.counter("ballast_test_requests_total", "Requests.\nTwo lines \\ here.", &[("op", "read")]);
        let w = r.counter("ballast_test_requests_total", "ignored", &[("op", "wr\"i\\te\n")]);
        let g = r.gauge("ballast_test_depth", "Depth.", &[]);
        c.add(3);
        w.inc();
        g.set(-7);
        assert!(Arc::ptr_eq(&c, &r.counter("ballast_test_requests_total", "", &[("op", "read")])), "same series");
        assert_eq!(
            r.render(),
            "# HELP ballast_test_requests_total Requests.\\nTwo lines \\\\ here.\n\
             # TYPE ballast_test_requests_total counter\n\
             ballast_test_requests_total{op=\"read\"} 3\n\
             ballast_test_requests_total{op=\"wr\\\"i\\\\te\\n\"} 1\n\
             # HELP ballast_test_depth Depth.\n\
             # TYPE ballast_test_depth gauge\n\
             ballast_test_depth -7\n"
        );
        assert_eq!(r.names(), vec!["ballast_test_requests_total", "ballast_test_depth"]);
    }

    #[test]
    fn histograms_are_cumulative_in_seconds_and_end_with_inf_equal_to_count() {
        let r = Registry::new();
        let h = r.histogram("ballast_test_seconds", "Latency.", &[("op", "write")], Unit::Seconds, &[1_000, 500]);
        h.observe(500); // on the bound: le is inclusive
        h.observe(700);
        h.observe_duration(Duration::from_secs(2));
        assert_eq!(
            r.render(),
            "# HELP ballast_test_seconds Latency.\n\
             # TYPE ballast_test_seconds histogram\n\
             ballast_test_seconds_bucket{op=\"write\",le=\"0.0000005\"} 1\n\
             ballast_test_seconds_bucket{op=\"write\",le=\"0.000001\"} 2\n\
             ballast_test_seconds_bucket{op=\"write\",le=\"+Inf\"} 3\n\
             ballast_test_seconds_sum{op=\"write\"} 2.0000012\n\
             ballast_test_seconds_count{op=\"write\"} 3\n"
        );
        let sizes = r.histogram("ballast_test_batch", "Sizes.", &[], Unit::Count, &size_buckets());
        sizes.observe(3);
        let text = r.render();
        assert!(text.contains("ballast_test_batch_bucket{le=\"2\"} 0\n"), "{text}");
        assert!(text.contains("ballast_test_batch_bucket{le=\"4\"} 1\n"), "{text}");
        assert!(text.contains("ballast_test_batch_sum 3\n"), "{text}");
    }

    #[test]
    fn latency_buckets_span_50_microseconds_to_10_seconds() {
        let b = latency_buckets();
        assert_eq!(b[0], 50_000);
        assert!(*b.last().unwrap() >= 10_000_000_000, "{b:?}");
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_name_registered_with_another_kind_is_not_rendered_twice() {
        let r = Registry::new();
        r.counter("ballast_test_x", "X.", &[]).inc();
        r.gauge("ballast_test_x", "X.", &[]).set(5);
        assert_eq!(r.render().matches("# TYPE ballast_test_x").count(), 1);
        assert!(r.render().contains("ballast_test_x 1\n"));
    }

    #[test]
    fn metric_names_are_checked() {
        assert!(valid_name("ballast_nbd_requests_total") && valid_name("a:b_1"));
        assert!(!valid_name("") && !valid_name("1abc") && !valid_name("a-b"));
    }
}
