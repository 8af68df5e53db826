//! Text from files and requests made safe to print: control characters escaped (a model file
//! cannot move the cursor, clear the screen or retitle the terminal) and length bounded.

/// `s` with control characters (C0, DEL, C1, and the bidirectional overrides) written as
/// `\u{1b}`-style escapes, cut to at most `max` characters (then `…` and the count left out).
pub fn escape(s: &str, max: usize) -> String {
    escape_inner(s, max, false)
}

/// [`escape`], keeping newlines and tabs (for multi-line messages and reports).
pub fn escape_lines(s: &str, max: usize) -> String {
    escape_inner(s, max, true)
}

fn escape_inner(s: &str, max: usize, lines: bool) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i >= max {
            let rest = s.chars().count() - i;
            out.push_str(&format!("… ({rest} more characters)"));
            break;
        }
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && !(lines && (c == '\n' || c == '\t'))) || bidi {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_cuts_long_text() {
        assert_eq!(
            escape("blk.0\u{1b}]0;pwned\u{7}", 100),
            "blk.0\\u{1b}]0;pwned\\u{7}"
        );
        assert_eq!(
            escape("a\u{1b}[2Jb\u{9b}c\u{202e}d", 100),
            "a\\u{1b}[2Jb\\u{9b}c\\u{202e}d"
        );
        assert_eq!(escape("héllo wörld", 5), "héllo… (6 more characters)");
        assert_eq!(escape("plain", 5), "plain");
        assert_eq!(escape("a\nb", 9), "a\\u{a}b");
        assert_eq!(escape_lines("a\n\tb\u{1b}c", 9), "a\n\tb\\u{1b}c");
    }
}
