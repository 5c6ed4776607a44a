//! `halo report`: one Markdown file (plus the same data as JSON beside it) with `halo doctor`
//! from every node, the software and firmware versions, the `halo bench` and
//! `halo bench --collective` results when given, and the RCCL lines that show which network
//! (and plugin) RCCL used. `--redact` hides host names, cluster addresses and secrets.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::cluster::{self, ClusterConfig};
use crate::process::run_bounded;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Markdown output; the JSON goes beside it with the extension .json.
    #[arg(long, value_name = "FILE", default_value = "halo-report.md")]
    pub out: PathBuf,
    /// `halo bench --json` output to include.
    #[arg(long, value_name = "FILE")]
    pub bench: Option<PathBuf>,
    /// `halo bench --collective --json` output to include.
    #[arg(long, value_name = "FILE")]
    pub collective: Option<PathBuf>,
    /// Replace host names, cluster IPs, user names and tokens with placeholders.
    #[arg(long)]
    pub redact: bool,
    /// `halo` on the other nodes (for their doctor).
    #[arg(long, value_name = "PATH", default_value = "halo")]
    pub remote_halo: String,
}

/// Prints KEY=VALUE lines; every probe tolerates a missing tool.
const VERSIONS_SCRIPT: &str = r#"
echo "kernel=$(uname -r)"
echo "os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
echo "rocm=$(cat /opt/rocm/.info/version 2>/dev/null || echo none)"
r=$(ls /opt/rocm/lib/librccl.so.*.* 2>/dev/null | head -n1); echo "rccl=${r##*librccl.so.}"
echo "rdma_core=$( (dpkg-query -W -f='${Version}' rdma-core || rpm -q --qf '%{VERSION}' rdma-core) 2>/dev/null | head -n1)"
for d in /sys/class/infiniband/*; do [ -e "$d/fw_ver" ] && echo "firmware_$(basename "$d")=$(cat "$d/fw_ver")"; done
for n in /sys/class/infiniband/*/device/net/*; do [ -e "$n" ] && command -v ethtool >/dev/null && echo "ethtool_$(basename "$n")=$(ethtool -i "$(basename "$n")" 2>/dev/null | sed -n 's/^firmware-version: //p')"; done
p="${HALO_PLUGIN:-${NCCL_NET_PLUGIN:-/opt/halo/lib/librccl-net-halo.so}}"
if [ -e "$p" ]; then echo "plugin=$p $(sha256sum "$p" | cut -c1-16) $(stat -c %s "$p") bytes"; else echo "plugin=$p (missing)"; fi
"#;

fn parse_kv(text: &str) -> Value {
    let mut m = serde_json::Map::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            m.insert(k.trim().to_string(), Value::String(v.trim().to_string()));
        }
    }
    Value::Object(m)
}

struct NodeTarget {
    label: String,
    ip: Option<String>,
    head: bool,
}

fn local_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && h != "(none)")
        .unwrap_or_else(|| "localhost".into())
}

/// Collects everything; `cfg` None means this node only.
pub fn collect(args: &ReportArgs, cfg: Option<&ClusterConfig>) -> Result<Value> {
    let exe = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "halo".into());
    let targets: Vec<NodeTarget> = match cfg {
        Some(c) => c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeTarget {
                label: n.host.clone(),
                ip: Some(n.ip.clone()),
                head: i == 0,
            })
            .collect(),
        None => vec![NodeTarget {
            label: local_hostname(),
            ip: None,
            head: true,
        }],
    };
    let mut nodes = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let run_on = |argv: Vec<String>| -> Result<crate::process::Captured> {
            let mut cmd = match cfg {
                Some(c) => cluster::node_command(c, &c.nodes[i], &argv),
                None => {
                    let mut cmd = std::process::Command::new(&argv[0]);
                    cmd.args(&argv[1..]);
                    cmd
                }
            };
            if let Some(c) = cfg {
                if t.head {
                    cmd.env("HALO_PLUGIN", &c.rccl.plugin);
                }
            }
            run_bounded(&mut cmd, Duration::from_secs(120))
        };
        let halo = if t.head {
            exe.clone()
        } else {
            args.remote_halo.clone()
        };
        let doctor = match run_on(vec![halo, "doctor".into(), "--json".into()]) {
            Ok(out) => serde_json::from_str::<Value>(&out.stdout).unwrap_or_else(
                |_| json!({"error": format!("halo doctor gave no JSON: {}", out.stderr.trim())}),
            ),
            Err(e) => json!({"error": format!("{e:#}")}),
        };
        let versions = match run_on(vec!["sh".into(), "-c".into(), VERSIONS_SCRIPT.into()]) {
            Ok(out) => parse_kv(&out.stdout),
            Err(e) => json!({"error": format!("{e:#}")}),
        };
        nodes.push(json!({"node": t.label, "ip": t.ip, "doctor": doctor, "versions": versions}));
    }
    let read_json = |p: &Option<PathBuf>| -> Result<Value> {
        match p {
            None => Ok(Value::Null),
            Some(p) => {
                let text = fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
            }
        }
    };
    let collective = read_json(&args.collective)?;
    let rccl_lines: Vec<Value> = collective["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let ev = v["transport"]["evidence"].as_array()?;
            Some(json!({"variant": v["variant"], "lines": ev}))
        })
        .collect();
    Ok(json!({
        "halo_version": env!("CARGO_PKG_VERSION"),
        "nodes": nodes,
        "bench": read_json(&args.bench)?,
        "collective": collective,
        "rccl_lines": rccl_lines,
    }))
}

pub fn render_markdown(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# halo report\n\nhalo {}\n",
        r["halo_version"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "## Versions\n");
    let nodes = r["nodes"].as_array().cloned().unwrap_or_default();
    let mut keys: Vec<String> = Vec::new();
    for n in &nodes {
        for k in n["versions"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let _ = write!(s, "| |");
    for n in &nodes {
        let _ = write!(s, " {} |", n["node"].as_str().unwrap_or("?"));
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(nodes.len()));
    for k in &keys {
        let _ = write!(s, "| {k} |");
        for n in &nodes {
            let _ = write!(s, " {} |", n["versions"][k].as_str().unwrap_or(""));
        }
        let _ = writeln!(s);
    }
    for n in &nodes {
        let _ = writeln!(s, "\n## Doctor: {}\n", n["node"].as_str().unwrap_or("?"));
        if let Some(e) = n["doctor"]["error"].as_str() {
            let _ = writeln!(s, "error: {e}");
            continue;
        }
        let _ = writeln!(s, "| check | verdict | value | fix |\n|---|---|---|---|");
        for c in n["doctor"]["checks"].as_array().into_iter().flatten() {
            let cell = |v: &Value| {
                v.as_str()
                    .unwrap_or("")
                    .replace('|', "\\|")
                    .replace('\n', " ")
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                cell(&c["title"]),
                cell(&c["verdict"]),
                cell(&c["value"]),
                cell(&c["fix"])
            );
        }
    }
    if let Some(sum) = r["bench"]["summary"].as_array() {
        let _ = writeln!(
            s,
            "\n## halo bench\n\n| path | latency (µs) | bandwidth (Gbps) |\n|---|---|---|"
        );
        for p in sum {
            let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                p["path"].as_str().unwrap_or("?"),
                num(&p["latency_us"]),
                num(&p["gbps"])
            );
        }
    }
    if let Some(vars) = r["collective"]["variants"].as_array() {
        let _ = writeln!(s, "\n## halo bench --collective\n");
        for v in vars {
            let _ = writeln!(s, "### {}\n", v["variant"].as_str().unwrap_or("?"));
            if let Some(e) = v["error"].as_str() {
                let _ = writeln!(s, "ERROR: {e}\n");
                continue;
            }
            let _ = writeln!(s, "| size (B) | count | type | op | time (µs) | algbw (GB/s) | busbw (GB/s) | #wrong |\n|---|---|---|---|---|---|---|---|");
            for row in v["rows"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} | {:.3} | {:.3} | {} |",
                    row["size"],
                    row["count"],
                    row["dtype"].as_str().unwrap_or(""),
                    row["op"].as_str().unwrap_or(""),
                    row["time_us"].as_f64().unwrap_or(0.0),
                    row["algbw_gbs"].as_f64().unwrap_or(0.0),
                    row["busbw_gbs"].as_f64().unwrap_or(0.0),
                    row["wrong"]
                );
            }
            for d in v["decode"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    s,
                    "\ndecode step {} × {} B all-reduce: {:.1} µs/step, #wrong {}",
                    d["ops"],
                    d["size"],
                    d["step_us"].as_f64().unwrap_or(0.0),
                    d["wrong"]
                );
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(s, "\n## RCCL lines (which network RCCL used)\n");
    let lines = r["rccl_lines"].as_array().cloned().unwrap_or_default();
    if lines.is_empty() {
        let _ = writeln!(s, "none (no RCCL run in this report)");
    }
    for l in lines {
        let _ = writeln!(s, "{}:\n```", l["variant"].as_str().unwrap_or("?"));
        for line in l["lines"].as_array().into_iter().flatten() {
            let _ = writeln!(s, "{}", line.as_str().unwrap_or(""));
        }
        let _ = writeln!(s, "```");
    }
    s
}

/// Words to hide: host names, cluster IPs, the user, and anything that looks like a token.
pub fn redact(text: &str, names: &[(String, String)]) -> String {
    let mut out = text.to_string();
    // Longest first, so "strix10" is not half-replaced by "strix1".
    let mut names: Vec<&(String, String)> = names.iter().filter(|(w, _)| w.len() > 1).collect();
    names.sort_by_key(|(w, _)| std::cmp::Reverse(w.len()));
    for (word, with) in names {
        out = out.replace(word.as_str(), with);
    }
    // Hugging Face tokens and KEY=VALUE secrets.
    let mut result = String::with_capacity(out.len());
    for line in out.split_inclusive('\n') {
        let mut l = line.to_string();
        while let Some(pos) = l.find("hf_") {
            let end = l[pos..]
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .map_or(l.len(), |e| pos + e);
            if end - pos < 8 {
                break;
            }
            l.replace_range(pos..end, "<token>");
        }
        for key in ["TOKEN=", "SECRET=", "PASSWORD=", "API_KEY="] {
            if let Some(pos) = l.find(key) {
                let start = pos + key.len();
                let end = l[start..]
                    .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                    .map_or(l.len(), |e| start + e);
                l.replace_range(start..end, "<redacted>");
            }
        }
        result.push_str(&l);
    }
    result
}

fn redactions(r: &Value) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (i, n) in r["nodes"].as_array().into_iter().flatten().enumerate() {
        if let Some(h) = n["node"].as_str() {
            v.push((h.to_string(), format!("node{}", i + 1)));
        }
        if let Some(ip) = n["ip"].as_str() {
            v.push((ip.to_string(), format!("<ip{}>", i + 1)));
        }
    }
    // Peers the doctors reached, unless they are nodes of the cluster already.
    for (i, n) in r["nodes"].as_array().into_iter().flatten().enumerate() {
        for p in n["doctor"]["peers"].as_array().into_iter().flatten() {
            if let Some(h) = p["node"].as_str() {
                if !v.iter().any(|(w, _)| w == h) {
                    v.push((h.to_string(), format!("peer-of-node{}", i + 1)));
                }
            }
        }
    }
    let host = local_hostname();
    if !v.iter().any(|(w, _)| *w == host) {
        v.push((host, "this-node".into()));
    }
    if let Ok(user) = std::env::var("USER") {
        if user.len() > 2 && user != "root" {
            v.push((format!("/home/{user}"), "/home/<user>".into()));
        }
    }
    v
}

pub fn run(args: &ReportArgs, config_path: &Path) -> Result<PathBuf> {
    let cfg = if config_path.exists() {
        Some(ClusterConfig::load(config_path)?)
    } else {
        None
    };
    let report = collect(args, cfg.as_ref())?;
    let mut md = render_markdown(&report);
    let mut js = serde_json::to_string_pretty(&report)?;
    if args.redact {
        let names = redactions(&report);
        md = redact(&md, &names);
        js = redact(&js, &names);
    }
    fs::write(&args.out, md).with_context(|| format!("cannot write {}", args.out.display()))?;
    let json_path = args.out.with_extension("json");
    fs::write(&json_path, js).with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(json_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "halo_version": "0.1.0",
            "nodes": [
                {"node": "strix1", "ip": "192.168.100.1",
                 "doctor": {"node": "strix1", "checks": [{"id": "k", "title": "kernel", "verdict": "pass", "value": "6.18.5 on strix1", "fix": null}],
                            "peers": [{"node": "strix2", "checks": []}]},
                 "versions": {"kernel": "6.18.5", "rccl": "2.27.7", "firmware_rocep1s0f0": "4.91"}},
                {"node": "strix2", "ip": "192.168.100.2", "doctor": {"error": "ssh: connect refused"},
                 "versions": {"kernel": "6.18.6"}}
            ],
            "bench": {"summary": [{"path": "E810, RDMA", "latency_us": 5.23, "gbps": 50.64}]},
            "collective": {"variants": [
                {"variant": "plugin", "error": null, "transport": {"evidence": ["strix1:1:2 [0] NCCL INFO Using network halo"]},
                 "rows": [{"op": "all_reduce", "dtype": "bf16", "size": 4096, "count": 2048, "time_us": 30.0, "algbw_gbs": 0.13, "busbw_gbs": 0.13, "wrong": 0}],
                 "decode": [{"ops": 64, "size": 8192, "step_us": 1500.0, "wrong": 0}]},
                {"variant": "ib", "error": "ib is not a IB run: RCCL used network Socket", "rows": []}
            ]},
            "rccl_lines": [{"variant": "plugin", "lines": ["strix1:1:2 [0] NCCL INFO Using network halo HF_TOKEN=hf_abcdefghijkl"]}]
        })
    }

    #[test]
    fn markdown_has_every_section() {
        let md = render_markdown(&sample());
        assert!(md.contains("| kernel | 6.18.5 | 6.18.6 |"), "{md}");
        assert!(md.contains("| rccl | 2.27.7 |  |"), "{md}");
        assert!(
            md.contains("## Doctor: strix2\n\nerror: ssh: connect refused"),
            "{md}"
        );
        assert!(md.contains("| E810, RDMA | 5.23 | 50.64 |"), "{md}");
        assert!(
            md.contains("| 4096 | 2048 | bf16 | all_reduce | 30.0 |"),
            "{md}"
        );
        assert!(
            md.contains("decode step 64 × 8192 B all-reduce: 1500.0 µs/step"),
            "{md}"
        );
        assert!(md.contains("ERROR: ib is not a IB run"), "{md}");
        assert!(md.contains("NCCL INFO Using network halo"), "{md}");
    }

    #[test]
    fn redaction_hides_hosts_ips_and_tokens() {
        let r = sample();
        let names = redactions(&r);
        let md = redact(&render_markdown(&r), &names);
        let js = redact(&serde_json::to_string(&r).unwrap(), &names);
        for text in [&md, &js] {
            assert!(
                !text.contains("strix1") && !text.contains("strix2"),
                "{text}"
            );
            assert!(!text.contains("192.168.100."), "{text}");
            assert!(!text.contains("hf_abcdefghijkl"), "{text}");
        }
        assert!(md.contains("## Doctor: node2"), "{md}");
        assert!(md.contains("6.18.5 on node1"), "{md}");
        assert!(
            md.contains("HF_TOKEN=<redacted>") || md.contains("<token>"),
            "{md}"
        );
        // Without --redact nothing changes.
        assert!(render_markdown(&r).contains("strix1"));
    }

    #[test]
    fn versions_lines() {
        let v = parse_kv("kernel=6.18.5\nrccl=2.27.7\ngarbage\nplugin=/opt/x.so abc 10 bytes\n");
        assert_eq!(v["kernel"], "6.18.5");
        assert_eq!(v["plugin"], "/opt/x.so abc 10 bytes");
    }
}
