//! The ladder chart: one bar per rung with its 95% interval, as SVG (for the HTML report) and
//! as PNG (drawn here with an 8×8 bitmap font, so no system fonts are needed).

/// One bar: label, value in [0, 1], interval.
#[derive(Debug, Clone)]
pub struct Bar {
    /// The rung's name.
    pub label: String,
    /// The mean of the primary metric.
    pub value: f64,
    /// The 95% bootstrap interval.
    pub ci: (f64, f64),
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Splits a label into lines of at most `width` characters (words kept whole where possible).
fn wrap(label: &str, width: usize, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for w in label.split_whitespace() {
        let w: String = w.chars().take(width).collect();
        if !cur.is_empty() && cur.chars().count() + 1 + w.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(&w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines.truncate(max_lines);
    lines
}

const W: usize = 960;
const H: usize = 540;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 50;
const BOTTOM: usize = 110;

fn geometry(n: usize) -> (f64, f64) {
    let slot = (W - LEFT - RIGHT) as f64 / n.max(1) as f64;
    (slot, slot * 0.6)
}

/// The chart as an SVG document.
pub fn svg(bars: &[Bar], title: &str, metric: &str) -> String {
    let (slot, bw) = geometry(bars.len());
    let plot_h = (H - TOP - BOTTOM) as f64;
    let y = |v: f64| TOP as f64 + plot_h * (1.0 - v.clamp(0.0, 1.0));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"28\" font-size=\"18\" text-anchor=\"middle\">{}</text>\n",
        W / 2,
        esc(title)
    );
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\">{}%</text>\n",
            W - RIGHT,
            LEFT - 6,
            y(v) + 4.0,
            (v * 100.0).round(),
            y = y(v)
        ));
    }
    s.push_str(&format!(
        "<text x=\"16\" y=\"{}\" font-size=\"13\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{}</text>\n",
        TOP as f64 + plot_h / 2.0,
        TOP as f64 + plot_h / 2.0,
        esc(metric)
    ));
    for (i, b) in bars.iter().enumerate() {
        let cx = LEFT as f64 + slot * (i as f64 + 0.5);
        let top = y(b.value);
        s.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"#3b6fb6\"><title>{}: {:.1}% (95% CI {:.1}–{:.1})</title></rect>\n",
            cx - bw / 2.0,
            y(0.0) - top,
            esc(&b.label),
            b.value * 100.0,
            b.ci.0 * 100.0,
            b.ci.1 * 100.0
        ));
        let (lo, hi) = (y(b.ci.0), y(b.ci.1));
        s.push_str(&format!(
            "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{lo:.1}\" y2=\"{hi:.1}\" stroke=\"#222\" stroke-width=\"1.5\"/><line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{lo:.1}\" y2=\"{lo:.1}\" stroke=\"#222\"/><line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{hi:.1}\" y2=\"{hi:.1}\" stroke=\"#222\"/>\n",
            cx - 6.0, cx + 6.0, cx - 6.0, cx + 6.0
        ));
        s.push_str(&format!(
            "<text x=\"{cx:.1}\" y=\"{:.1}\" font-size=\"13\" text-anchor=\"middle\">{:.1}%</text>\n",
            hi.min(top) - 6.0,
            b.value * 100.0
        ));
        for (li, line) in wrap(&b.label, (slot / 7.0) as usize, 4).iter().enumerate() {
            s.push_str(&format!(
                "<text x=\"{cx:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n",
                y(0.0) + 18.0 + 15.0 * li as f64,
                esc(line)
            ));
        }
    }
    s.push_str(&format!(
        "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#222\"/>\n</svg>\n",
        W - RIGHT,
        y(0.0),
        y(0.0)
    ));
    s
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, rgb: [u8; 3]) {
        let (xa, xb) = (
            x0.min(x1).max(0.0) as usize,
            x0.max(x1).min(W as f64) as usize,
        );
        let (ya, yb) = (
            y0.min(y1).max(0.0) as usize,
            y0.max(y1).min(H as f64) as usize,
        );
        for y in ya..yb {
            for x in xa..xb {
                self.px[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&rgb);
            }
        }
    }

    /// Text in the 8×8 font at `scale`, centred on `cx` when `center`.
    fn text(&mut self, s: &str, x: f64, y: f64, scale: usize, center: bool) {
        let n = s.chars().count();
        let x0 = if center {
            x - (n * 8 * scale) as f64 / 2.0
        } else {
            x
        };
        for (i, c) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY
                .get(c as usize)
                .copied()
                .unwrap_or(font8x8::legacy::BASIC_LEGACY[b'?' as usize]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        let px = x0 + ((i * 8 + col) * scale) as f64;
                        let py = y + (row * scale) as f64;
                        self.rect(px, py, px + scale as f64, py + scale as f64, [20, 20, 20]);
                    }
                }
            }
        }
    }
}

/// The chart as PNG bytes.
pub fn png(bars: &[Bar], title: &str) -> Vec<u8> {
    let mut c = Canvas::new();
    let (slot, bw) = geometry(bars.len());
    let plot_h = (H - TOP - BOTTOM) as f64;
    let y = |v: f64| TOP as f64 + plot_h * (1.0 - v.clamp(0.0, 1.0));
    c.text(title, W as f64 / 2.0, 14.0, 2, true);
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        c.rect(
            LEFT as f64,
            y(v),
            (W - RIGHT) as f64,
            y(v) + 1.0,
            [221, 221, 221],
        );
        let label = format!("{}%", (v * 100.0).round());
        c.text(
            &label,
            LEFT as f64 - 8.0 - (label.len() * 8) as f64,
            y(v) - 4.0,
            1,
            false,
        );
    }
    for (i, b) in bars.iter().enumerate() {
        let cx = LEFT as f64 + slot * (i as f64 + 0.5);
        let top = y(b.value);
        c.rect(cx - bw / 2.0, top, cx + bw / 2.0, y(0.0), [59, 111, 182]);
        let (lo, hi) = (y(b.ci.0), y(b.ci.1));
        c.rect(cx - 1.0, hi, cx + 1.0, lo + 1.0, [34, 34, 34]);
        c.rect(cx - 6.0, lo, cx + 6.0, lo + 1.5, [34, 34, 34]);
        c.rect(cx - 6.0, hi, cx + 6.0, hi + 1.5, [34, 34, 34]);
        c.text(
            &format!("{:.1}%", b.value * 100.0),
            cx,
            hi.min(top) - 14.0,
            1,
            true,
        );
        for (li, line) in wrap(&b.label, (slot / 8.5) as usize, 5).iter().enumerate() {
            c.text(line, cx, y(0.0) + 10.0 + 12.0 * li as f64, 1, true);
        }
    }
    c.rect(
        LEFT as f64,
        y(0.0),
        (W - RIGHT) as f64,
        y(0.0) + 1.5,
        [34, 34, 34],
    );
    let mut out = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut out, W as u32, H as u32);
        enc.set_color(::png::ColorType::Rgb);
        enc.set_depth(::png::BitDepth::Eight);
        // Writing into a Vec cannot fail but for a bug; an empty picture is the fallback.
        if let Ok(mut w) = enc.write_header() {
            let _ = w.write_image_data(&c.px);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bars() -> Vec<Bar> {
        vec![
            Bar {
                label: "prompt only".into(),
                value: 0.2,
                ci: (0.1, 0.3),
            },
            Bar {
                label: "few-shot <k=3>".into(),
                value: 0.5,
                ci: (0.4, 0.6),
            },
        ]
    }

    #[test]
    fn png_decodes_to_the_chart_size_with_blue_bars() {
        let bytes = png(&bars(), "ladder");
        let dec = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (W as u32, H as u32));
        // The second bar's middle, halfway up its height, is bar blue.
        let (slot, _) = geometry(2);
        let x = (LEFT as f64 + slot * 1.5) as usize;
        let plot_h = (H - TOP - BOTTOM) as f64;
        let yy = (TOP as f64 + plot_h * (1.0 - 0.25)) as usize;
        assert_eq!(
            &buf[(yy * W + x + 10) * 3..(yy * W + x + 10) * 3 + 3],
            &[59, 111, 182]
        );
    }

    #[test]
    fn svg_escapes_labels_and_draws_every_bar() {
        let s = svg(&bars(), "t", "accuracy");
        assert!(s.contains("few-shot &lt;k=3&gt;"));
        assert_eq!(s.matches("<rect x=").count(), 2);
        assert!(s.contains("50.0%"));
    }

    #[test]
    fn wrap_keeps_lines_short() {
        assert_eq!(
            wrap("retrieved few-shot by HyDE", 10, 4),
            vec!["retrieved", "few-shot", "by HyDE"]
        );
    }
}
