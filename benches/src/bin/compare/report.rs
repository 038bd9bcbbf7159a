//! Statistics over rounds, the printed report, the generated section of
//! `docs/PERFORMANCE.md` and the two SVG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plotters::prelude::*;

use crate::BoxError;

/// The values of one workload's rounds.
#[derive(Debug, Clone)]
pub struct Stat(Vec<f64>);

impl Stat {
    /// From the rounds' values (at least one).
    pub fn new(mut v: Vec<f64>) -> Stat {
        assert!(!v.is_empty(), "a workload ran no round");
        v.sort_by(f64::total_cmp);
        Stat(v)
    }

    /// The median round.
    pub fn median(&self) -> f64 {
        let n = self.0.len();
        if n % 2 == 1 {
            self.0[n / 2]
        } else {
            f64::midpoint(self.0[n / 2 - 1], self.0[n / 2])
        }
    }

    /// The fastest-to-slowest range of the rounds.
    pub fn min(&self) -> f64 {
        self.0[0]
    }

    /// See [`Stat::min`].
    pub fn max(&self) -> f64 {
        self.0[self.0.len() - 1]
    }

    /// `median [min–max]`, unformatted numbers.
    pub fn fmt(&self) -> String {
        format!("{:.0} [{:.0}–{:.0}]", self.median(), self.min(), self.max())
    }
}

/// What a workload's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds per operation (lower is better).
    Ns,
    /// Operations per second (higher is better).
    PerSec,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Ns if v >= 10_000.0 => format!("{:.1} µs", v / 1e3),
            Unit::Ns => format!("{v:.0} ns"),
            Unit::PerSec if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
            Unit::PerSec => format!("{:.0} k/s", v / 1e3),
        }
    }

    fn show_stat(self, s: &Stat) -> String {
        format!(
            "{} ({}–{})",
            self.show(s.median()),
            self.show(s.min()),
            self.show(s.max())
        )
    }
}

/// One line of the table.
pub struct Row {
    workload: String,
    unit: Unit,
    sessio: Stat,
    peer_name: String,
    peer: Stat,
}

impl Row {
    /// A row; the ratio is taken so that above 1 means sessio is faster.
    pub fn new(workload: &str, unit: Unit, sessio: Stat, peer_name: &str, peer: Stat) -> Row {
        Row {
            workload: workload.to_string(),
            unit,
            sessio,
            peer_name: peer_name.to_string(),
            peer,
        }
    }

    fn ratio(&self) -> f64 {
        match self.unit {
            Unit::Ns => self.peer.median() / self.sessio.median(),
            Unit::PerSec => self.sessio.median() / self.peer.median(),
        }
    }

    /// What the console line and the docs' table both show, in their
    /// order: workload, sessio's figures, the peer and its figures, the ratio.
    fn shown(&self) -> (&str, String, &str, String, f64) {
        (
            &self.workload,
            self.unit.show_stat(&self.sessio),
            &self.peer_name,
            self.unit.show_stat(&self.peer),
            self.ratio(),
        )
    }
}

/// Everything one run measured.
pub struct Report {
    quick: bool,
    rows: Vec<Row>,
    ratios: Vec<(String, f64)>,
    notes: Vec<String>,
    /// (sessions, sessio read ns, floor ns).
    pub read_curve: Vec<(u64, Stat, Stat)>,
    /// (series name, [(batch, per second)]).
    pub batch_curve: Vec<(String, Vec<(usize, Stat)>)>,
}

impl Report {
    /// An empty report.
    pub fn new(quick: bool) -> Report {
        Report {
            quick,
            rows: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
            read_curve: Vec::new(),
            batch_curve: Vec::new(),
        }
    }

    /// A table row.
    pub fn row(&mut self, r: Row) {
        let (workload, sessio, peer_name, peer, ratio) = r.shown();
        println!("{workload}: sessio {sessio} | {peer_name} {peer} | ratio {ratio:.2}");
        self.rows.push(r);
    }

    /// A named ratio (printed as `ratio NAME=VALUE`).
    pub fn ratio(&mut self, name: &str, v: f64) {
        self.ratios.push((name.to_string(), v));
    }

    /// A remark printed now and kept for the docs.
    pub fn note(&mut self, line: String) {
        println!("note: {line}");
        self.notes.push(line);
    }

    fn table(&self) -> String {
        let mut t = String::from(
            "| workload | sessio: median (min–max of rounds) | peer | peer: median (min–max) | ratio (> 1: sessio faster) |\n\
             | --- | ---: | --- | ---: | ---: |\n",
        );
        for r in &self.rows {
            let (workload, sessio, peer_name, peer, ratio) = r.shown();
            let _ = writeln!(
                t,
                "| {workload} | {sessio} | {peer_name} | {peer} | **{ratio:.2}** |"
            );
        }
        t
    }

    fn ratio_lines(&self) -> String {
        let mut s = String::new();
        for (n, v) in &self.ratios {
            let _ = writeln!(s, "ratio {n}={v:.3}");
        }
        s
    }

    fn curves(&self) -> String {
        let mut t = String::from(
            "| sessions | sessio read | floor | sessio / floor |\n| ---: | ---: | ---: | ---: |\n",
        );
        for (n, e, f) in &self.read_curve {
            let _ = writeln!(
                t,
                "| {n} | {} | {} | {:.1}× |",
                Unit::Ns.show_stat(e),
                Unit::Ns.show_stat(f),
                e.median() / f.median()
            );
        }
        t.push_str("\n| deltas / SETs per second | ");
        let batches: Vec<usize> = self
            .batch_curve
            .first()
            .map(|(_, c)| c.iter().map(|(b, _)| *b).collect())
            .unwrap_or_default();
        for b in &batches {
            let _ = write!(t, "batch {b} | ");
        }
        t.push_str("\n| --- |");
        for _ in &batches {
            t.push_str(" ---: |");
        }
        t.push('\n');
        for (name, c) in &self.batch_curve {
            let _ = write!(t, "| {name} |");
            for (_, s) in c {
                let _ = write!(t, " {} |", Unit::PerSec.show(s.median()));
            }
            t.push('\n');
        }
        t
    }

    /// Prints the report and, with `write_doc`, writes it into
    /// `docs/PERFORMANCE.md` (and the plots, in a full run).
    pub fn finish(&self, took: Duration, write_doc: bool) -> Result<(), BoxError> {
        let command = format!(
            "cargo run --release -p sessio-benches --bin compare{}",
            if self.quick { " -- --quick" } else { "" }
        );
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| | |\n| --- | --- |\n| CPU | {} |\n| kernel | Linux {} |\n| commit | {} |\n| command | `{command}` |\n| peers | {} |\n| run time | {} |\n| rounds | {} per workload, {} ms each at most |\n",
            cpu(),
            kernel(),
            commit(),
            peer_versions(),
            human(took),
            crate::ROUNDS,
            if self.quick { 250 } else { 1000 },
        );
        s.push_str(&self.table());
        s.push('\n');
        s.push_str(&self.curves());
        s.push_str("\n```text\n");
        s.push_str(&self.ratio_lines());
        s.push_str("```\n");
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        println!("\n{}", self.table());
        println!("{}", self.curves());
        print!("{}", self.ratio_lines());
        println!("run time {}", human(took));
        if write_doc {
            let docs = docs_dir();
            if !self.quick {
                draw_read(&docs.join("read_scaling.svg"), &self.read_curve)?;
                draw_batches(&docs.join("batch_scaling.svg"), &self.batch_curve)?;
                s.push_str("\n![read latency against sessions](read_scaling.svg)\n\n![throughput against batch size](batch_scaling.svg)\n");
            }
            let which = if self.quick { "quick" } else { "full" };
            write_section(&docs.join("PERFORMANCE.md"), which, &s)?;
            println!("written to docs/PERFORMANCE.md ({which} run section)");
        }
        Ok(())
    }
}

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
}

/// Replaces what lies between `<!-- compare:WHICH:begin -->` and its end
/// marker, or appends a new section with both runs' markers.
fn write_section(path: &Path, which: &str, body: &str) -> Result<(), BoxError> {
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let begin = format!("<!-- compare:{which}:begin -->");
    let end = format!("<!-- compare:{which}:end -->");
    let block = format!("{begin}\n{body}{end}");
    let new = match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &doc[..b], &doc[e + end.len()..]),
        _ => format!(
            "{}\n## Side by side with Redis and memcached\n\n### {which} run (generated by the harness)\n\n{block}\n",
            doc.trim_end()
        ),
    };
    std::fs::write(path, new)?;
    Ok(())
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("{model}, {cores} cores")
}

/// The kernel's version numbers, without the build's local suffix.
fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |_| "unknown".into(),
        |s| {
            s.trim()
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()
                .unwrap_or_default()
                .to_string()
        },
    )
}

fn run_out(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn commit() -> String {
    let Some(head) = run_out("git", &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = run_out("git", &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("`{head}` + uncommitted changes")
    } else {
        format!("`{head}`")
    }
}

fn peer_versions() -> String {
    let redis = run_out("redis-server", &["--version"])
        .and_then(|s| {
            s.split_whitespace()
                .find_map(|w| w.strip_prefix("v="))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into());
    let mc = run_out("memcached", &["-V"]).unwrap_or_else(|| "memcached not installed".into());
    format!("Redis {redis} (`--save \"\" --appendonly no`), {mc}")
}

const PALETTE: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
];

type Series = (String, Vec<(f64, Stat)>);

/// A log–log plot of median points joined by lines, min–max of the rounds
/// as a vertical bar at each point. Text is written as SVG `<text>`; no
/// font file is read.
fn plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), BoxError> {
    let pts = || series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, s) in pts() {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(s.min());
        y1 = y1.max(s.max());
    }
    if x0 > x1 {
        return Ok(());
    }
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x0 / 1.3..x1 * 1.3).log_scale(),
            (y0 / 1.5..y1 * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| short(*y))
        .draw()?;
    for (i, (name, v)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                v.iter().map(|(x, s)| (*x, s.median())),
                c.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(
            v.iter()
                .map(|(x, s)| Circle::new((*x, s.median()), 3, c.filled())),
        )?;
        chart.draw_series(
            v.iter()
                .map(|(x, s)| PathElement::new(vec![(*x, s.min()), (*x, s.max())], c)),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map_or(s.clone(), str::to_string)
}

fn draw_read(path: &Path, curve: &[(u64, Stat, Stat)]) -> Result<(), BoxError> {
    let e = curve
        .iter()
        .map(|(n, e, _)| (*n as f64, e.clone()))
        .collect();
    let f = curve
        .iter()
        .map(|(n, _, f)| (*n as f64, f.clone()))
        .collect();
    plot(
        path,
        "Read one attribute of a 1 KB session (4 KiB pages)",
        "sessions in the arena",
        "ns per read",
        &[
            ("sessio read(sid).get(attr)".into(), e),
            ("floor: bare random read, same mapping size".into(), f),
        ],
    )
}

fn draw_batches(path: &Path, curves: &[(String, Vec<(usize, Stat)>)]) -> Result<(), BoxError> {
    let series: Vec<Series> = curves
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                c.iter().map(|(b, s)| (*b as f64, s.clone())).collect(),
            )
        })
        .collect();
    plot(
        path,
        "Deltas (or Redis SETs) acknowledged per second, 100 B each",
        "batch size (Redis: pipeline depth)",
        "per second",
        &series,
    )
}
