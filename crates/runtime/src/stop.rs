//! Stop strings in streamed text: held back until they are known not to be one.

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until it is known not to be one, so a stop string never reaches the sink.
pub struct StopScanner {
    stops: Vec<String>,
    /// All text accepted so far (the final output).
    pub text: String,
    emitted: usize,
    stopped: bool,
}

impl StopScanner {
    /// A scanner for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string matched.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let search_from = self.emitted;
        self.text.push_str(piece);
        // Earliest complete match starting at or after what is already emitted.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| search_from + p)
            })
            .min();
        if let Some(pos) = hit {
            self.text.truncate(pos);
            self.stopped = true;
            let out = self.text[self.emitted..].to_string();
            self.emitted = self.text.len();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text[self.emitted..].ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let upto = self.text.len() - hold;
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        (out, false)
    }

    /// Ends the stream: adds `tail` and releases anything held back.
    pub fn finish(&mut self, tail: &str) -> String {
        let (mut out, stopped) = self.push(tail);
        if !stopped {
            out.push_str(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let mut s = StopScanner::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = vec![];
        let mut stopped = false;
        for p in pieces {
            let (e, st) = s.push(p);
            out.push(e);
            if st {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push(s.finish(""));
        }
        (out, s.text.clone(), stopped)
    }

    #[test]
    fn stop_string_split_across_pieces_never_reaches_the_sink() {
        let (out, text, stopped) = run(&["###"], &["Hello #", "#", "# world"]);
        assert!(stopped);
        assert_eq!(text, "Hello ");
        assert_eq!(out.concat(), "Hello ");
        assert!(out.iter().all(|p| !p.contains('#')), "{out:?}");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_is_not_a_stop() {
        let (out, text, stopped) = run(&["END"], &["a E", "N", "x", "y"]);
        assert!(!stopped);
        assert_eq!(text, "a ENxy");
        assert_eq!(out.concat(), "a ENxy");
        assert_eq!(out[0], "a ");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        let (_, text, stopped) = run(&["é!", "b"], &["aé", "!b"]);
        assert!(stopped);
        assert_eq!(text, "a");
        let (out, text, _) = run(&["ü"], &["ü"]);
        assert_eq!(text, "");
        assert_eq!(out.concat(), "");
    }
}
