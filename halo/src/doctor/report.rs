//! The human-readable doctor table.

use std::fmt::Write;

use super::{NodeReport, Verdict};

fn symbol(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "✔ pass",
        Verdict::Warn => "! warn",
        Verdict::Fail => "✘ FAIL",
        Verdict::Skip => "- skip",
    }
}

pub fn render_table(report: &NodeReport) -> String {
    let mut out = String::new();
    render_node(report, &mut out);
    for peer in &report.peers {
        out.push('\n');
        render_node(peer, &mut out);
    }
    out
}

fn render_node(report: &NodeReport, out: &mut String) {
    let _ = writeln!(out, "halo doctor: node {}", report.node);
    let width = report
        .checks
        .iter()
        .map(|c| c.title.chars().count())
        .max()
        .unwrap_or(0);
    for c in &report.checks {
        let _ = writeln!(
            out,
            "  {}  {:width$}  {}",
            symbol(c.verdict),
            c.title,
            c.value
        );
        if !c.fix.is_empty() && c.verdict != Verdict::Pass {
            let _ = writeln!(out, "  {:6}  {:width$}  fix: {}", "", "", c.fix);
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
