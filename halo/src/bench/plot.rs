//! Values against message size as SVG panels side by side (log2 sizes on x), and as a PNG
//! through `rsvg-convert` when the file name asks for one. `halo bench` draws latency and
//! bandwidth; `halo bench --collective` draws bus bandwidth and the decode-step rows.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// One line of a panel: (message size in bytes, value).
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(u64, f64)>,
    /// Colour slot [default: the series' position in its panel].
    pub color: Option<usize>,
    /// Stroke pattern slot: 0 solid, then dashed, dotted, dash-dot.
    pub dash: usize,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(u64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
            color: None,
            dash: 0,
        }
    }
}

/// One chart: its title, y-axis label, lines, and whether y is log-scaled.
#[derive(Debug, Clone, Copy)]
pub struct Panel<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub series: &'a [Series],
    pub log_y: bool,
}

/// What `--plot FILE` writes, from FILE's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Svg,
    Png,
}

/// The format `path` asks for; an error for anything but .svg and .png. Callers check this
/// before measuring anything, so a typo does not cost a whole run.
pub fn format_of(path: &Path) -> Result<Format> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => bail!(
            "--plot takes a .svg or .png file name, not {}",
            path.display()
        ),
    }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];
const DASHES: [&str; 4] = ["", "6,3", "2,3", "8,3,2,3"];
const W: f64 = 520.0;
const H: f64 = 340.0;
const M: (f64, f64, f64, f64) = (70.0, 20.0, 40.0, 50.0); // left, right, top, bottom
const LEGEND_ROW: f64 = 16.0;

fn size_label(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{}M", b >> 20),
        b if b >= 1 << 10 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// Legend rows under a panel: two entries per row.
fn legend_rows(series: &[Series]) -> usize {
    series.len().div_ceil(2)
}

fn panel(svg: &mut String, x0: f64, p: &Panel) {
    let (title, unit, series, log_y) = (p.title, p.unit, p.series, p.log_y);
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
        let color = COLORS[s.color.unwrap_or(i) % COLORS.len()];
        let dash = DASHES[s.dash % DASHES.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(b, v)| format!("{:.1},{:.1}", px(b), py(v)))
            .collect();
        let label = xml_escape(&s.label);
        let _ = writeln!(svg, r#"<g class="series" data-label="{label}">"#);
        if !path.is_empty() {
            let dash_attr = if dash.is_empty() {
                String::new()
            } else {
                format!(r#" stroke-dasharray="{dash}""#)
            };
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>"#,
                path.join(" ")
            );
            for p in &path {
                let (x, y) = p.split_once(',').expect("x,y");
                let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="2.5" fill="{color}"/>"#);
            }
        }
        svg.push_str("</g>\n");
        // The legend sits under the panel, two entries per row.
        let lx = x0 + M.0 + (i % 2) as f64 * (W - M.0) / 2.0 - 50.0;
        let ly = H + LEGEND_ROW * (i / 2) as f64 + 4.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="3"{}/><text x="{}" y="{ly}" font-size="11" font-family="sans-serif">{label}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            if dash.is_empty() {
                String::new()
            } else {
                format!(r#" stroke-dasharray="{dash}""#)
            },
            lx + 24.0
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

/// The SVG document: the panels side by side, each with its legend underneath.
pub fn svg_panels(panels: &[Panel]) -> String {
    let width = W * panels.len().max(1) as f64;
    let rows = panels
        .iter()
        .map(|p| legend_rows(p.series))
        .max()
        .unwrap_or(0);
    let height = H + LEGEND_ROW * rows as f64 + 8.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        panel(&mut s, W * i as f64, p);
    }
    s.push_str("</svg>\n");
    s
}

/// Checks a plot target before anything is measured: a `.svg` or `.png` name ([`format_of`]) in
/// an existing directory, and for PNG the `rsvg-convert` that renders it.
pub fn check_target(path: &Path) -> Result<Format> {
    let format = format_of(path)?;
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

/// `halo bench`'s chart: latency (µs, log scale) on the left, bandwidth (Gbps) on the right.
pub fn svg(latency: &[Series], bandwidth: &[Series]) -> String {
    svg_panels(&[
        Panel {
            title: "one-way latency",
            unit: "latency (µs)",
            series: latency,
            log_y: true,
        },
        Panel {
            title: "bandwidth",
            unit: "bandwidth (Gbps)",
            series: bandwidth,
            log_y: false,
        },
    ])
}

/// Writes an SVG document to `path`: as is for .svg, rendered by `rsvg-convert` (Debian:
/// librsvg2-bin) for .png.
pub fn write_doc(path: &Path, doc: &str) -> Result<()> {
    match check_target(path)? {
        Format::Svg => {
            std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))
        }
        Format::Png => {
            let tmp = path.with_extension("svg.tmp");
            std::fs::write(&tmp, doc).with_context(|| format!("writing {}", tmp.display()))?;
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

/// Writes `halo bench`'s chart to `path` (see [`write_doc`]).
pub fn write(path: &Path, latency: &[Series], bandwidth: &[Series]) -> Result<()> {
    write_doc(path, &svg(latency, bandwidth))
}

/// Checks on written plots, shared by the tests of everything that draws one.
#[cfg(test)]
pub(crate) mod check {
    /// Err(why) unless `doc` is well-formed XML with an `<svg>` root (tags balanced and
    /// properly nested, attribute values quoted, no stray `<` or `&`).
    pub fn well_formed_svg(doc: &str) -> Result<(), String> {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = doc.trim();
        let mut roots = 0;
        while let Some(open) = rest.find('<') {
            text_ok(&rest[..open])?;
            let close = rest[open..]
                .find('>')
                .ok_or_else(|| format!("unclosed tag at {:?}", &rest[open..]))?;
            let tag = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(top) if top == name.trim() => {}
                    other => return Err(format!("</{name}> closes {other:?}")),
                }
                continue;
            }
            let self_closing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body.split_whitespace().next().unwrap_or("");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == ':') {
                return Err(format!("bad tag name in <{tag}>"));
            }
            if !body[name.len()..].matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            text_ok(body)?;
            if stack.is_empty() {
                roots += 1;
                if name != "svg" {
                    return Err(format!("root element is <{name}>, not <svg>"));
                }
            }
            if !self_closing {
                stack.push(name);
            }
        }
        text_ok(rest)?;
        match (stack.is_empty(), roots) {
            (true, 1) => Ok(()),
            (false, _) => Err(format!("unclosed elements {stack:?}")),
            (_, n) => Err(format!("{n} root elements")),
        }
    }

    fn text_ok(text: &str) -> Result<(), String> {
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..];
            if !["&amp;", "&lt;", "&gt;", "&quot;"]
                .iter()
                .any(|e| entity.starts_with(e))
            {
                return Err(format!("bare & in {text:?}"));
            }
        }
        Ok(())
    }

    /// (label, points drawn) of every series, in drawing order.
    pub fn series_points(doc: &str) -> Vec<(String, usize)> {
        doc.split(r#"<g class="series" data-label=""#)
            .skip(1)
            .map(|part| {
                let (label, body) = part.split_once('"').expect("label");
                let body = &body[..body.find("</g>").expect("</g>")];
                let label = label
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&amp;", "&");
                (label, body.matches("<circle").count())
            })
            .collect()
    }

    /// (width, height) from a PNG's header; Err unless the bytes start like a PNG.
    pub fn png_size(bytes: &[u8]) -> Result<(u32, u32), String> {
        if bytes.len() < 24 || !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || &bytes[12..16] != b"IHDR"
        {
            return Err("not a PNG".into());
        }
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        Ok((be(&bytes[16..20]), be(&bytes[20..24])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_both_panels_a_line_per_series_and_escaped_labels() {
        let lat = vec![
            Series::new("TCP", vec![(8, 60.0), (4096, 80.0)]),
            Series::new("RDMA <plugin>", vec![(8, 5.0), (4096, 7.5)]),
        ];
        let bw = vec![Series::new("RDMA", vec![(65536, 20.0), (1 << 20, 48.0)])];
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
        assert_eq!(format_of(Path::new("a/b.SVG")).unwrap(), Format::Svg);
        assert_eq!(format_of(Path::new("b.png")).unwrap(), Format::Png);
        for bad in ["b.jpg", "b", "svg", "b.svg.txt"] {
            let e = format_of(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("--plot takes a .svg or .png file name"), "{e}");
        }
    }

    #[test]
    fn the_checks_catch_broken_documents() {
        use check::*;
        let lat = vec![Series::new("A & B", vec![(8, 1.0), (16, 2.0), (32, 0.0)])];
        let doc = svg(&lat, &[]);
        assert_eq!(well_formed_svg(&doc), Ok(()));
        // The zero is not drawn on a log axis.
        assert_eq!(series_points(&doc), [("A & B".to_string(), 2)]);
        for broken in [
            doc.replacen("</g>", "", 1),
            doc.replacen("&amp;", "&", 1),
            doc.replacen("<svg", "<div", 1),
            format!("{doc}<svg></svg>"),
        ] {
            assert!(well_formed_svg(&broken).is_err(), "{broken}");
        }
    }
}
