//! The human-readable doctor report: a headline, then one table per node wrapped to the
//! terminal's width.

use std::fmt::Write;

use super::{NodeReport, Verdict};

/// Width used when neither `COLUMNS` nor the terminal says.
pub const DEFAULT_WIDTH: usize = 100;
/// Below this the table would be unreadable anyway.
const MIN_WIDTH: usize = 60;

fn symbol(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "✔ pass",
        Verdict::Warn => "! warn",
        Verdict::Fail => "✘ FAIL",
        Verdict::Skip => "- skip",
    }
}

/// The width to wrap at: `COLUMNS`, else the terminal on stdout, else [`DEFAULT_WIDTH`].
pub fn terminal_width() -> usize {
    if let Some(cols) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c > 0)
    {
        return cols;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `ws`; on a
    // descriptor that is not a terminal it fails without writing.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        DEFAULT_WIDTH
    }
}

pub fn render_table(report: &NodeReport, width: usize) -> String {
    let width = width.max(MIN_WIDTH);
    let mut out = String::new();
    let _ = writeln!(out, "{}", report.headline());
    render_node(report, width, &mut out);
    for peer in &report.peers {
        out.push('\n');
        render_node(peer, width, &mut out);
    }
    out
}

/// Splits `text` into lines of at most `width` characters at spaces; a word longer than the
/// width (a path, a URL) stays whole on a line of its own.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let needed = line.chars().count() + usize::from(!line.is_empty()) + word.chars().count();
        if !line.is_empty() && needed > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

fn render_node(report: &NodeReport, width: usize, out: &mut String) {
    let _ = writeln!(out, "halo doctor: node {}", report.node);
    // Titles longer than a third of the line wrap inside their column.
    let title_w = report
        .checks
        .iter()
        .map(|c| c.title.chars().count())
        .max()
        .unwrap_or(0)
        .min(width / 3);
    // "  ✔ pass  " is 10 columns, then the title and two spaces.
    let value_col = 10 + title_w + 2;
    let value_w = width.saturating_sub(value_col).max(20);
    let fix_indent = 10;
    let fix_w = width.saturating_sub(fix_indent + 5).max(20);
    for c in &report.checks {
        let titles = wrap(&c.title, title_w);
        let values = wrap(&c.value, value_w);
        let rows = titles.len().max(values.len());
        for i in 0..rows {
            let head = if i == 0 { symbol(c.verdict) } else { "" };
            let t = titles.get(i).map_or("", String::as_str);
            let v = values.get(i).map_or("", String::as_str);
            let line = format!("  {head:6}  {t:title_w$}  {v}");
            let _ = writeln!(out, "{}", line.trim_end());
        }
        if !c.fix.is_empty() && c.verdict != Verdict::Pass {
            for (i, l) in wrap(&c.fix, fix_w).iter().enumerate() {
                let label = if i == 0 { "fix: " } else { "     " };
                let _ = writeln!(out, "{:fix_indent$}{label}{l}", "");
            }
        }
    }
    let count = |v| report.checks.iter().filter(|c| c.verdict == v).count();
    let _ = writeln!(
        out,
        "  {} pass, {} warn, {} fail, {} skip",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail),
        count(Verdict::Skip)
    );
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrapping_keeps_long_words_whole() {
        assert_eq!(wrap("a bb ccc dddd", 6), ["a bb", "ccc", "dddd"]);
        assert_eq!(
            wrap("x /a/very/long/path/name y", 8),
            ["x", "/a/very/long/path/name", "y"]
        );
        assert_eq!(wrap("", 10), [""]);
    }
}
