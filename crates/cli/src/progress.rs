//! Progress for long jobs: indicatif bars on a terminal, and plain throttled lines when stderr
//! goes to a file or a pipe (`nohup ... > log`), where indicatif draws nothing at all.

use indicatif::ProgressBar;
use std::time::{Duration, Instant};

/// How often a plain progress line is written when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(30);

/// Prints `line` above `bar` on a terminal, or as a plain line when the bar cannot draw.
pub fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        bar.println(line.as_ref());
    }
}

/// Decides when a plain progress line is due: never while `bar` draws itself, otherwise at most
/// once per `every`, and always when forced (the last step of a job).
pub struct Ticker {
    every: Duration,
    last: Option<Instant>,
}

impl Ticker {
    /// A ticker that allows a line at most once per `every` (the first one at once).
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether to write a plain line for `bar` now; records the time when it says yes.
    pub fn due(&mut self, bar: &ProgressBar, force: bool) -> bool {
        self.due_at(bar.is_hidden(), force, Instant::now())
    }

    fn due_at(&mut self, plain: bool, force: bool, now: Instant) -> bool {
        if !plain {
            return false;
        }
        let due = force
            || self
                .last
                .is_none_or(|t| now.duration_since(t) >= self.every);
        if due {
            self.last = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_are_throttled_and_forced_ones_always_pass() {
        let mut t = Ticker::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(t.due_at(true, false, t0), "the first line is due at once");
        assert!(!t.due_at(true, false, t0 + Duration::from_secs(10)));
        assert!(t.due_at(true, true, t0 + Duration::from_secs(11)), "forced");
        assert!(!t.due_at(true, false, t0 + Duration::from_secs(40)));
        assert!(t.due_at(true, false, t0 + Duration::from_secs(41)));
        // A bar that draws itself never needs a plain line.
        let mut tty = Ticker::new(Duration::ZERO);
        assert!(!tty.due_at(false, true, t0));
    }
}
