//! A progress bar on stderr for long start-up work (`loraplex serve` loading a base
//! model's weights, layer by layer). Drawn only when stderr is a terminal, redrawn in
//! place; elsewhere (logs, CI) it stays silent and the log lines say what happened.

use std::io::{IsTerminal, Write};
use std::time::Instant;

const WIDTH: usize = 30;

/// One bar: `label [#####-----] done/total  elapsed`.
pub struct Bar {
    label: String,
    started: Instant,
    tty: bool,
}

impl Bar {
    pub fn new(label: impl Into<String>) -> Self {
        Bar {
            label: label.into(),
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// The line for `done` of `total`.
    pub fn line(&self, done: usize, total: usize) -> String {
        let total = total.max(1);
        let done = done.min(total);
        let filled = WIDTH * done / total;
        format!(
            "{} [{}{}] {done}/{total} {:.1}s",
            self.label,
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.started.elapsed().as_secs_f32()
        )
    }

    pub fn set(&self, done: usize, total: usize) {
        if self.tty {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r{}", self.line(done, total));
            let _ = e.flush();
        }
    }

    /// Draw it full and end the line.
    pub fn finish(&self, total: usize) {
        if self.tty {
            let _ = writeln!(std::io::stderr(), "\r{}", self.line(total, total));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bar_fills_with_progress() {
        let b = super::Bar::new("loading");
        assert!(b
            .line(0, 4)
            .starts_with("loading [------------------------------] 0/4"));
        assert!(b
            .line(2, 4)
            .contains("[###############---------------] 2/4"));
        assert!(b.line(9, 4).contains("4/4"));
        assert!(b.line(0, 0).contains("0/1"));
    }
}
