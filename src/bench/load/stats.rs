//! What the load benchmark counts and how it prints it: latencies per operation, answers
//! by status code (good and bad requests apart), tokens trained and sampled, the server's
//! RSS over time with its least-squares slope, and the verdict (what failed).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

/// Failure messages kept in full; beyond them only counted.
const MAX_MESSAGES: usize = 30;

/// Whether a request was meant to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Good,
    Bad,
}

/// The outcome of one bad request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Answered with this 4xx.
    Status(u16),
    /// Accepted as a job whose future then failed with category `user` (the Tinker
    /// protocol refuses a training request's content in its `seq_id` order).
    FutureUser,
}

#[derive(Default)]
pub struct Stats {
    /// (op, class) → latencies of single HTTP exchanges, seconds.
    pub latency: BTreeMap<(&'static str, Class), Vec<f64>>,
    /// op → submit-to-result latencies of good future operations, seconds.
    pub result_latency: BTreeMap<&'static str, Vec<f64>>,
    /// (op, class) → answer → count. Answers are status codes, or `future:user` /
    /// `future:server` for futures that failed, or `transport` for no answer.
    pub answers: BTreeMap<(&'static str, Class), BTreeMap<String, u64>>,
    /// Bad request kind → refusal → count; `accepted` and `5xx` are failures.
    pub bad_outcomes: BTreeMap<&'static str, BTreeMap<String, u64>>,
    pub requests: u64,
    pub retries_429: u64,
    pub good_ok: u64,
    pub good_failed: u64,
    pub bad_refused: u64,
    pub bad_accepted: u64,
    pub server_errors: u64,
    pub trained_tokens: u64,
    pub sampled_tokens: u64,
    pub messages: Vec<String>,
    pub more_messages: u64,
}

impl Stats {
    pub fn exchange(&mut self, op: &'static str, class: Class, answer: String, took: Duration) {
        self.requests += 1;
        if answer.starts_with('5') && answer.len() == 3 {
            self.server_errors += 1;
        }
        self.latency
            .entry((op, class))
            .or_default()
            .push(took.as_secs_f64());
        *self
            .answers
            .entry((op, class))
            .or_default()
            .entry(answer)
            .or_default() += 1;
    }

    pub fn future_failed(&mut self, op: &'static str, class: Class, category: &str) {
        *self
            .answers
            .entry((op, class))
            .or_default()
            .entry(format!("future:{category}"))
            .or_default() += 1;
    }

    pub fn message(&mut self, m: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(m);
        } else {
            self.more_messages += 1;
        }
    }

    pub fn good_failure(&mut self, m: String) {
        self.good_failed += 1;
        self.message(format!("good request failed: {m}"));
    }

    pub fn bad_outcome(&mut self, kind: &'static str, outcome: Result<Refusal, String>) {
        let key = match &outcome {
            Ok(Refusal::Status(s)) => s.to_string(),
            Ok(Refusal::FutureUser) => "future:user".to_owned(),
            Err(e) => e.clone(),
        };
        *self
            .bad_outcomes
            .entry(kind)
            .or_default()
            .entry(key)
            .or_default() += 1;
        match outcome {
            Ok(_) => self.bad_refused += 1,
            Err(e) => {
                self.bad_accepted += 1;
                self.message(format!("bad request {kind} was not refused: {e}"));
            }
        }
    }
}

/// Nearest-rank percentile.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[k - 1]
}

/// Least-squares slope of y over x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// RSS samples of the server: (seconds since the load started, MB).
#[derive(Default, Clone)]
pub struct Rss {
    pub samples: Vec<(f64, f64)>,
}

impl Rss {
    /// MB per minute over the second half of the run.
    pub fn second_half_slope(&self) -> Option<f64> {
        let end = self.samples.last()?.0;
        let half: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= end / 2.0)
            .map(|&(t, mb)| (t / 60.0, mb))
            .collect();
        slope(&half)
    }

    pub fn max(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.1).reduce(f64::max)
    }
}

fn ms(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else {
        format!("{:.0}", s * 1e3)
    }
}

fn class_name(c: Class) -> &'static str {
    match c {
        Class::Good => "good",
        Class::Bad => "bad",
    }
}

/// The printed report: throughput, latency, answers, bad request outcomes, RSS, verdict.
pub fn render(stats: &Stats, rss: &Rss, wall: f64, header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}\n");
    let _ = writeln!(
        out,
        "| throughput over {wall:.1} s | total | per second |\n|---|---|---|"
    );
    let good_bad = |c: Class| -> u64 {
        stats
            .latency
            .iter()
            .filter(|((_, k), _)| *k == c)
            .map(|(_, v)| v.len() as u64)
            .sum()
    };
    let rows = [
        ("HTTP requests", stats.requests),
        ("  of them good", good_bad(Class::Good)),
        ("  of them bad", good_bad(Class::Bad)),
        ("good operations completed", stats.good_ok),
        ("trained tokens (forward_backward)", stats.trained_tokens),
        ("sampled tokens", stats.sampled_tokens),
    ];
    for (name, n) in rows {
        let _ = writeln!(out, "| {name} | {n} | {:.1} |", n as f64 / wall.max(1e-9));
    }
    let _ = writeln!(
        out,
        "\n| operation (one HTTP exchange) | class | count | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|"
    );
    for ((op, class), v) in &stats.latency {
        let mut v = v.clone();
        let max = v.iter().copied().fold(f64::NAN, f64::max);
        let _ = writeln!(
            out,
            "| {op} | {} | {} | {} | {} | {} |",
            class_name(*class),
            v.len(),
            ms(percentile(&mut v, 0.5)),
            ms(percentile(&mut v, 0.99)),
            ms(max)
        );
    }
    let _ = writeln!(
        out,
        "\n| good operation, submit to result | count | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|"
    );
    for (op, v) in &stats.result_latency {
        let mut v = v.clone();
        let max = v.iter().copied().fold(f64::NAN, f64::max);
        let _ = writeln!(
            out,
            "| {op} | {} | {} | {} | {} |",
            v.len(),
            ms(percentile(&mut v, 0.5)),
            ms(percentile(&mut v, 0.99)),
            ms(max)
        );
    }
    let _ = writeln!(
        out,
        "\n| operation | class | answers (status or future outcome × count) |\n|---|---|---|"
    );
    for ((op, class), m) in &stats.answers {
        let list: Vec<String> = m.iter().map(|(a, n)| format!("{a} × {n}")).collect();
        let _ = writeln!(
            out,
            "| {op} | {} | {} |",
            class_name(*class),
            list.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\n| bad request kind | refused with (× count) |\n|---|---|"
    );
    for (kind, m) in &stats.bad_outcomes {
        let list: Vec<String> = m.iter().map(|(a, n)| format!("{a} × {n}")).collect();
        let _ = writeln!(out, "| {kind} | {} |", list.join(", "));
    }
    let _ = writeln!(out, "\n| t s | server RSS MB |\n|---|---|");
    let n = rss.samples.len();
    let picks: Vec<usize> = if n <= 12 {
        (0..n).collect()
    } else {
        let mut p: Vec<usize> = (0..10).map(|i| i * (n - 1) / 10).collect();
        p.push(n - 1);
        p
    };
    for i in picks {
        let (t, mb) = rss.samples[i];
        let _ = writeln!(out, "| {t:.0} | {mb:.1} |");
    }
    let _ = writeln!(
        out,
        "\nRSS: {n} samples, max {} MB, slope over the second half {} MB/min",
        rss.max().map_or("-".into(), |m| format!("{m:.1}")),
        rss.second_half_slope()
            .map_or("-".into(), |s| format!("{s:+.2}"))
    );
    let _ = writeln!(
        out,
        "\ngood operations: {} succeeded, {} failed; 429 answers retried: {}; bad requests: {} refused, {} not refused; 5xx answers: {}",
        stats.good_ok,
        stats.good_failed,
        stats.retries_429,
        stats.bad_refused,
        stats.bad_accepted,
        stats.server_errors
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_percentiles() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)).collect();
        assert!((slope(&pts).unwrap() - 3.0).abs() < 1e-12);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 5.0)]), None);
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }

    #[test]
    fn rss_slope_uses_the_second_half_in_mb_per_minute() {
        // Growth of 60 MB/min for 60 s, then flat: the second half is flat.
        let mut r = Rss::default();
        for t in 0..=120 {
            let mb = 100.0 + f64::from(t.min(60));
            r.samples.push((f64::from(t), mb));
        }
        assert!(r.second_half_slope().unwrap().abs() < 1e-9);
        let mut g = Rss::default();
        g.samples = (0..=60).map(|t| (f64::from(t), f64::from(t))).collect();
        assert!((g.second_half_slope().unwrap() - 60.0).abs() < 1e-9);
    }

    #[test]
    fn answers_classify_failures() {
        let mut s = Stats::default();
        s.exchange("x", Class::Good, "503".into(), Duration::ZERO);
        s.exchange("x", Class::Good, "200".into(), Duration::ZERO);
        assert_eq!(s.server_errors, 1);
        s.bad_outcome("k", Ok(Refusal::Status(404)));
        s.bad_outcome("k", Err("accepted with 200".into()));
        assert_eq!((s.bad_refused, s.bad_accepted), (1, 1));
        assert_eq!(s.messages.len(), 1);
    }
}
