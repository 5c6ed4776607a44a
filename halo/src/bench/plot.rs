//! Latency and bandwidth against message size as an SVG (two panels, log-scaled sizes), and as a
//! PNG through `rsvg-convert` when the file name asks for one.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// One line of a panel: (message size in bytes, value).
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(u64, f64)>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];
const W: f64 = 520.0;
const H: f64 = 340.0;
const M: (f64, f64, f64, f64) = (70.0, 20.0, 40.0, 50.0); // left, right, top, bottom

fn size_label(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

fn panel(svg: &mut String, x0: f64, title: &str, unit: &str, series: &[Series], log_y: bool) {
    let pts: Vec<(u64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.1 > 0.0)
        .collect();
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle" font-family="sans-serif">{title}</text>"#,
        x0 + W / 2.0
    );
    if pts.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="13" text-anchor="middle" font-family="sans-serif">no data</text>"#,
            x0 + W / 2.0,
            H / 2.0
        );
        return;
    }
    let lx = |b: u64| (b.max(1) as f64).log2();
    let (xmin, xmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(lx(p.0)), b.max(lx(p.0)))
    });
    let fy = |v: f64| if log_y { v.log10() } else { v };
    let (mut ymin, mut ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(fy(p.1)), b.max(fy(p.1)))
    });
    if log_y {
        ymin = ymin.floor();
        ymax = ymax.ceil().max(ymin + 1.0);
    } else {
        ymin = 0.0;
        ymax = (ymax * 1.1).max(1e-9);
    }
    let xspan = (xmax - xmin).max(1.0);
    let (pl, pr, pt, pb) = (x0 + M.0, x0 + W - M.1, M.2, H - M.3);
    let px = |b: u64| pl + (lx(b) - xmin) / xspan * (pr - pl);
    let py = |v: f64| pb - (fy(v) - ymin) / (ymax - ymin) * (pb - pt);
    let _ = writeln!(
        svg,
        r##"<rect x="{pl}" y="{pt}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        pr - pl,
        pb - pt
    );
    // x ticks at every power of two present, labelled every other one when crowded
    let step = if xspan > 12.0 { 2 } else { 1 };
    for (i, e) in (xmin as u32..=xmax as u32).enumerate() {
        let x = pl + (f64::from(e) - xmin) / xspan * (pr - pl);
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{pb}" x2="{x}" y2="{}" stroke="#444"/>"##,
            pb + 4.0
        );
        if i % step == 0 {
            let _ = writeln!(
                svg,
                r#"<text x="{x}" y="{}" font-size="11" text-anchor="middle" font-family="sans-serif">{}</text>"#,
                pb + 17.0,
                size_label(1u64 << e)
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle" font-family="sans-serif">message size (bytes)</text>"#,
        (pl + pr) / 2.0,
        H - 12.0
    );
    for k in 0..=4 {
        let v = ymin + (ymax - ymin) * f64::from(k) / 4.0;
        let y = pb - (pb - pt) * f64::from(k) / 4.0;
        let shown = if log_y { 10f64.powf(v) } else { v };
        let _ = writeln!(
            svg,
            r##"<line x1="{pl}" y1="{y}" x2="{pr}" y2="{y}" stroke="#ddd"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="end" font-family="sans-serif">{}</text>"#,
            pl - 6.0,
            y + 4.0,
            fmt_num(shown)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle" font-family="sans-serif" transform="rotate(-90 {} {})">{unit}</text>"#,
        x0 + 16.0,
        (pt + pb) / 2.0,
        x0 + 16.0,
        (pt + pb) / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(b, v)| format!("{:.1},{:.1}", px(b), py(v)))
            .collect();
        if path.is_empty() {
            continue;
        }
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').expect("x,y");
            let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>"#);
        }
        let ly = pt + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}" font-size="11" font-family="sans-serif">{}</text>"#,
            pl + 8.0,
            ly - 4.0,
            pl + 24.0,
            ly,
            xml_escape(&s.label)
        );
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document: latency (µs, log scale) on the left, bandwidth (Gbps) on the right.
pub fn svg(latency: &[Series], bandwidth: &[Series]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{H}" viewBox="0 0 {} {H}">"#,
        2.0 * W,
        2.0 * W
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    panel(
        &mut s,
        0.0,
        "one-way latency",
        "latency (µs)",
        latency,
        true,
    );
    panel(&mut s, W, "bandwidth", "bandwidth (Gbps)", bandwidth, false);
    s.push_str("</svg>\n");
    s
}

/// The formats `--plot` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Svg,
    Png,
}

/// Checks a plot target before anything is measured: a `.svg` or `.png` name in an existing
/// directory, and for PNG the `rsvg-convert` that renders it.
pub fn check_target(path: &Path) -> Result<Format> {
    let format = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Format::Svg,
        Some("png") => Format::Png,
        _ => bail!(
            "--plot takes a .svg or .png file name, not {}",
            path.display()
        ),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--plot {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if format == Format::Png {
        let found = std::process::Command::new("rsvg-convert")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !found.is_ok_and(|s| s.success()) {
            bail!(
                "--plot {}: PNG output needs rsvg-convert (apt-get install librsvg2-bin), or name a .svg file",
                path.display()
            );
        }
    }
    Ok(format)
}

/// Writes the plot to `path`: SVG as is, PNG rendered by `rsvg-convert` (Debian: librsvg2-bin).
pub fn write(path: &Path, latency: &[Series], bandwidth: &[Series]) -> Result<()> {
    let doc = svg(latency, bandwidth);
    match check_target(path)? {
        Format::Svg => {
            std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))
        }
        Format::Png => {
            let tmp = path.with_extension("svg.tmp");
            std::fs::write(&tmp, doc)?;
            let out = std::process::Command::new("rsvg-convert")
                .arg("-o")
                .arg(path)
                .arg(&tmp)
                .output();
            let _ = std::fs::remove_file(&tmp);
            match out {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => bail!(
                    "rsvg-convert failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => {
                    bail!("PNG output needs rsvg-convert (apt-get install librsvg2-bin): {e}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_panels_a_line_per_series_and_escaped_labels() {
        let lat = vec![
            Series {
                label: "TCP".into(),
                points: vec![(8, 60.0), (4096, 80.0)],
            },
            Series {
                label: "RDMA <plugin>".into(),
                points: vec![(8, 5.0), (4096, 7.5)],
            },
        ];
        let bw = vec![Series {
            label: "RDMA".into(),
            points: vec![(65536, 20.0), (1 << 20, 48.0)],
        }];
        let s = svg(&lat, &bw);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("one-way latency") && s.contains("bandwidth (Gbps)"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert!(s.contains("RDMA &lt;plugin&gt;"));
        assert!(s.contains(">1M<") && s.contains(">4K<"));
    }

    #[test]
    fn empty_panels_say_so_and_bad_extensions_are_refused() {
        assert!(svg(&[], &[]).contains("no data"));
        assert!(write(Path::new("/nonexistent/x.jpg"), &[], &[]).is_err());
        let e = check_target(Path::new("bench.jpg"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(".svg or .png"), "{e}");
        let e = check_target(Path::new("/nonexistent/dir/b.svg"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert_eq!(check_target(Path::new("b.SVG")).unwrap(), Format::Svg);
    }
}
