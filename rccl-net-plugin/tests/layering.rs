//! The module layering of the plugin, checked on its source so that it cannot regress:
//!
//! ```text
//! abi ──> net ──> protocol          (pure, no I/O)
//!          ├────> oob ──> config
//!          ├────> gpu ──> config    (ROCm loading and the registration probe)
//!          └────> halo_ibverbs
//! ```
//!
//! `log` and `config` sit below everything. No module imports one above it, and the modules form
//! a DAG. The same holds for the modules of `halo-ibverbs`, whose completions (`wc`) know nothing
//! of the crate's error type and its errors nothing of devices. The source is read as text:
//! comments and string literals are left out, every
//! `crate::m` path (also inside `use crate::{…}` groups) and every `super::` chain that reaches
//! the crate root counts as a use of `m`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// What each top-level module must not use: the modules above it or beside it, and the crates
/// it has no business with.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // The C ABI adapters call the version-neutral net only.
    ("abi", &["gpu", "oob", "protocol", "halo_ibverbs"]),
    // net drives everything below it and knows nothing of ABI versions.
    ("net", &["abi"]),
    // ROCm loading and the probe: plain data for net, never net's types.
    ("gpu", &["abi", "net", "oob", "protocol"]),
    // The clear-to-send protocol is pure: no verbs, no sockets, no GPU.
    ("protocol", &["abi", "net", "oob", "gpu", "halo_ibverbs"]),
    ("oob", &["abi", "net", "gpu", "protocol", "halo_ibverbs"]),
    // Settings may be typed with the verbs crate's own types (e.g. its address family).
    ("config", &["abi", "net", "gpu", "oob", "protocol"]),
    (
        "log",
        &[
            "abi",
            "net",
            "gpu",
            "oob",
            "protocol",
            "config",
            "halo_ibverbs",
        ],
    ),
];

/// Crates whose mention counts as a use (they have no `crate::` prefix).
const EXTERNAL: &[&str] = &["halo_ibverbs", "halo_ffi"];

#[test]
fn modules_use_only_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let uses = crate_uses(&src, EXTERNAL);
    let modules: BTreeSet<&str> = uses.keys().map(String::as_str).collect();
    for (m, _) in FORBIDDEN {
        assert!(modules.contains(m), "no module {m} under {}", src.display());
    }
    let mut bad = Vec::new();
    for (m, forbidden) in FORBIDDEN {
        for u in &uses[*m] {
            if forbidden.contains(&u.target.as_str()) {
                bad.push(format!("{}:{}: {m} uses {}", u.file, u.line, u.target));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports against the layering:\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn top_level_modules_form_a_dag() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let uses = crate_uses(&src, &[]);
    if let Some(cycle) = find_cycle(&uses) {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
}

/// What each module of `halo-ibverbs` must not use.
const VERBS_FORBIDDEN: &[(&str, &[&str])] = &[
    // A completion is plain data; `error` wraps it (`VerbsError::Completion`), not the reverse.
    ("wc", &["error", "device"]),
    ("error", &["device"]),
];

fn verbs_src() -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../halo-ibverbs/src");
    assert!(src.join("lib.rs").is_file(), "{} not found", src.display());
    src
}

#[test]
fn verbs_modules_form_a_dag() {
    let uses = crate_uses(&verbs_src(), &[]);
    if let Some(cycle) = find_cycle(&uses) {
        panic!("halo-ibverbs module cycle: {}", cycle.join(" -> "));
    }
    let mut bad = Vec::new();
    for (m, forbidden) in VERBS_FORBIDDEN {
        let Some(list) = uses.get(*m) else {
            panic!("no module {m} in halo-ibverbs")
        };
        for u in list {
            if forbidden.contains(&u.target.as_str()) {
                bad.push(format!("{}:{}: {m} uses {}", u.file, u.line, u.target));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "halo-ibverbs imports against the layering:\n  {}",
        bad.join("\n  ")
    );
}

/// One use of another module (or of an external crate) by a source file.
#[derive(Debug)]
struct Use {
    file: String,
    line: usize,
    target: String,
}

/// The uses of each top-level module of the crate rooted at `src` (files of `src/m.rs` and
/// `src/m/**`), uses of itself left out. The crate root (`lib.rs`) is not a module of its own.
fn crate_uses(src: &Path, external: &[&str]) -> BTreeMap<String, Vec<Use>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut top_level = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let name = first.trim_end_matches(".rs").to_string();
        if name != "lib" {
            top_level.insert(name);
        }
    }
    let mut out: BTreeMap<String, Vec<Use>> =
        top_level.iter().map(|m| (m.clone(), Vec::new())).collect();
    for f in &files {
        let rel = f.strip_prefix(src).unwrap();
        let path = module_path(rel);
        let Some(own) = path.first() else { continue };
        let text = code_only(&fs::read_to_string(f).unwrap());
        for (line, target) in root_paths(&text, path.len()) {
            if &target != own && top_level.contains(&target) {
                out.get_mut(own).unwrap().push(Use {
                    file: rel.display().to_string(),
                    line,
                    target,
                });
            }
        }
        for (line, word) in words(&text) {
            if external.contains(&word) {
                out.get_mut(own).unwrap().push(Use {
                    file: rel.display().to_string(),
                    line,
                    target: word.to_string(),
                });
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `lib.rs` → [], `log.rs` → [log], `net/mod.rs` → [net], `net/comm.rs` → [net, comm].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// `text` with comments and the contents of string and character literals blanked out (newlines
/// kept, so that line numbers stay right).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !is_ident(c[i - 1]))
        {
            // Raw string r"…" or r#"…"#.
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            out.push(' ');
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            i += 1;
        } else if c[i] == '\'' && next == Some('\\') {
            // Escaped character literal: '\n', '\'', '\u{..}'.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            i += 3;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Identifiers of `text` with their line numbers.
fn words(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for w in line.split(|ch: char| !is_ident(ch)) {
            if !w.is_empty() {
                out.push((n + 1, w));
            }
        }
    }
    out
}

/// Tokens of Rust paths: identifiers and the punctuation that matters here.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(text: &str) -> Vec<(usize, Tok)> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if is_ident(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            out.push((line, Tok::Ident(c[start..i].iter().collect())));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((line, Tok::PathSep));
            i += 2;
        } else {
            out.push((
                line,
                match ch {
                    '{' => Tok::Open,
                    '}' => Tok::Close,
                    ',' => Tok::Comma,
                    _ => Tok::Other,
                },
            ));
            i += 1;
        }
    }
    out
}

/// The first segment (a top-level module) of every path from the crate root in `text`, with its
/// line: `crate::m`, `$crate::m`, the items of `crate::{m, n::x}`, and `super::…::m` where the
/// chain of `super` climbs `depth` levels or more (the file's module sits `depth` levels deep).
fn root_paths(text: &str, depth: usize) -> Vec<(usize, String)> {
    let t = tokens(text);
    let ident = |k: usize| match t.get(k) {
        Some((_, Tok::Ident(s))) => Some(s.as_str()),
        _ => None,
    };
    let is = |k: usize, tok: Tok| t.get(k).map(|(_, x)| x) == Some(&tok);
    let mut out = Vec::new();
    let mut k = 0;
    while k < t.len() {
        // A path starts at `crate` or at the first `super` of a chain.
        let starts = k == 0 || !is(k - 1, Tok::PathSep);
        let after = match ident(k) {
            Some("crate") if starts && is(k + 1, Tok::PathSep) => Some(k + 2),
            Some("super") if starts && is(k + 1, Tok::PathSep) => {
                let mut j = k;
                let mut ups = 0;
                while ident(j) == Some("super") && is(j + 1, Tok::PathSep) {
                    ups += 1;
                    j += 2;
                }
                (depth > 0 && ups >= depth).then_some(j)
            }
            _ => None,
        };
        let Some(j) = after else {
            k += 1;
            continue;
        };
        if is(j, Tok::Open) {
            // `{a, b::c, d::{e, f}}`: the first identifier of each item at the outer level.
            let mut level = 0;
            let mut first = true;
            let mut m = j;
            while m < t.len() {
                match &t[m].1 {
                    Tok::Open => {
                        level += 1;
                        if level == 1 {
                            first = true;
                        }
                    }
                    Tok::Close => {
                        level -= 1;
                        if level == 0 {
                            break;
                        }
                    }
                    Tok::Comma if level == 1 => first = true,
                    Tok::Ident(s) if level == 1 && first => {
                        out.push((t[m].0, s.clone()));
                        first = false;
                    }
                    _ => {}
                }
                m += 1;
            }
            k = m;
        } else {
            if let Some(s) = ident(j) {
                out.push((t[j].0, s.to_string()));
            }
            k = j;
        }
    }
    out
}

/// A cycle among the modules of `uses` (each use an edge), if there is one.
fn find_cycle(uses: &BTreeMap<String, Vec<Use>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        uses: &BTreeMap<String, Vec<Use>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        let targets: BTreeSet<&str> = uses[m].iter().map(|u| u.target.as_str()).collect();
        for n in targets {
            if !uses.contains_key(n) {
                continue;
            }
            match state.get(n).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == n).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(n.to_string());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(n, uses, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in uses.keys() {
        if state.get(m).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(m, uses, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_scanner_sees_every_form_of_import() {
    let text = code_only(
        r##"
// crate::abi in a comment
/* crate::abi /* nested */ crate::abi */
let s = "crate::abi"; let r = r#"crate::abi"#; let c = '"'; let d = '\'';
use crate::log::{info, NET};
use crate::{config::GpuReg, net::{self, x}};
$crate::oob::f();
use super::super::gpu::probe;
use super::sibling;
let t: halo_ibverbs::Gid;
"##,
    );
    let found: Vec<String> = root_paths(&text, 2).into_iter().map(|(_, m)| m).collect();
    assert_eq!(found, ["log", "config", "net", "oob", "gpu"]);
    let lines: Vec<usize> = root_paths(&text, 2).into_iter().map(|(l, _)| l).collect();
    assert_eq!(lines, [5, 6, 6, 7, 8]);
    assert!(root_paths("use super::super::gpu;", 3).is_empty());
    assert!(words(&text).contains(&(10, "halo_ibverbs")));
    assert!(!text.contains("abi"));
}
