//! A loss-curve picture as a self-contained SVG (training loss and evaluation loss by step).

/// Renders `train` and `eval` `(step, loss)` series as an SVG document.
pub fn loss_svg(title: &str, train: &[(usize, f64)], eval: &[(usize, f64)]) -> String {
    let (w, h) = (720.0f64, 400.0f64);
    let (left, right, top, bottom) = (60.0, 20.0, 40.0, 40.0);
    let all = train.iter().chain(eval).filter(|(_, l)| l.is_finite());
    let max_step = all.clone().map(|(s, _)| *s).max().unwrap_or(1).max(1) as f64;
    let min_step = all.clone().map(|(s, _)| *s).min().unwrap_or(0) as f64;
    let lo = all.clone().map(|(_, l)| *l).fold(f64::INFINITY, f64::min);
    let hi = all.map(|(_, l)| *l).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 0.5, lo + 0.5)
    } else {
        (0.0, 1.0)
    };
    let span = (max_step - min_step).max(1.0);
    let x = |s: usize| left + (s as f64 - min_step) / span * (w - left - right);
    let y = |l: f64| top + (hi - l) / (hi - lo) * (h - top - bottom);
    let line = |pts: &[(usize, f64)], color: &str| {
        let p: Vec<String> = pts
            .iter()
            .filter(|(_, l)| l.is_finite())
            .map(|&(s, l)| format!("{:.1},{:.1}", x(s), y(l)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
            p.join(" ")
        )
    };
    let mut out = String::new();
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    ));
    out.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"24\" font-size=\"14\">{}</text>\n",
        escape(title)
    ));
    // Axes and tick labels.
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        h - bottom,
        w - right,
        h - bottom
    ));
    for i in 0..=4 {
        let l = lo + (hi - lo) * i as f64 / 4.0;
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{l:.3}</text>\n",
            left - 6.0,
            y(l) + 4.0
        ));
        let s = (min_step + span * i as f64 / 4.0).round() as usize;
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{s}</text>\n",
            x(s),
            h - bottom + 16.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">step</text>\n",
        (left + w - right) / 2.0,
        h - 6.0
    ));
    if !train.is_empty() {
        out.push_str(&line(train, "#1f77b4"));
        out.push('\n');
    }
    if !eval.is_empty() {
        out.push_str(&line(eval, "#d62728"));
        out.push('\n');
        for &(s, l) in eval.iter().filter(|(_, l)| l.is_finite()) {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#d62728\"/>\n",
                x(s),
                y(l)
            ));
        }
    }
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{top}\" fill=\"#1f77b4\" text-anchor=\"end\">train loss</text>\n<text x=\"{}\" y=\"{}\" fill=\"#d62728\" text-anchor=\"end\">eval loss</text>\n",
        w - right,
        w - right,
        top + 16.0
    ));
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_series() {
        let svg = loss_svg("a<b", &[(1, 2.0), (2, 1.5), (3, 1.0)], &[(3, 1.2)]);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains("<circle"));
    }
}
