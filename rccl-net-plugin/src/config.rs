//! Plugin configuration: every environment variable the plugin honours, read once into
//! [`PluginConfig`] and passed down from `init`.
//!
//! Names, defaults and list syntax follow NCCL's built-in IB transport so that a job script
//! written for it behaves the same with this plugin. An invalid value is an error that names
//! the variable, the value and what is accepted; an empty value counts as unset.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// The configuration of one process, read once at `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// `NCCL_IB_HCA`: which RDMA devices (and ports) to use; unset = all active ports.
    pub ib_hca: Option<HcaFilter>,
    /// `NCCL_IB_GID_INDEX`: a fixed GID table index (0..=255); unset or -1 = pick one
    /// automatically from `roce_version`, `addr_family` and `addr_range`.
    pub gid_index: Option<u32>,
    /// `NCCL_IB_ROCE_VERSION_NUM`: RoCE version of the GID to pick automatically, 1 or 2; default 2.
    pub roce_version: u8,
    /// `NCCL_IB_ADDR_FAMILY`: `AF_INET` (default) or `AF_INET6`; the address family of the GID
    /// to pick automatically.
    pub addr_family: AddrFamily,
    /// `NCCL_IB_ADDR_RANGE`: `a.b.c.d/len` or `v6addr/len`; when set, only GIDs inside this
    /// network are picked automatically.
    pub addr_range: Option<(IpAddr, u8)>,
    /// `NCCL_IB_TIMEOUT`: local ACK timeout exponent (4.096 µs × 2^n), 1..=31; default 20.
    pub timeout: u8,
    /// `NCCL_IB_RETRY_CNT`: transport retry count, 0..=7; default 7.
    pub retry_cnt: u8,
    /// `NCCL_IB_TC`: traffic class of the GRH, 0..=255; default 0.
    pub traffic_class: u8,
    /// `NCCL_IB_SL`: service level, 0..=15; default 0.
    pub service_level: u8,
    /// `NCCL_SOCKET_IFNAME`: which interfaces the out-of-band TCP bootstrap may bind to; unset =
    /// the interface behind the RDMA device.
    pub socket_ifname: Option<IfFilter>,
    /// `NCCL_IB_QPS_PER_CONNECTION`: RC queue pairs per connection, 1..=16; unset = the
    /// device's own default (`NetDevice::default_qps`: 2 on Intel E810/irdma, else 1).
    pub qps_per_connection: Option<u32>,
    /// `NCCL_IB_SPLIT_DATA_ON_QPS`: 1 = split each message over all QPs of a connection,
    /// 0 = round-robin whole messages over them; default 0.
    pub split_data_on_qps: bool,
    /// `NCCL_IB_USE_INLINE`: 1 (the default) = queue pairs ask for inline room (a whole
    /// clear-to-send row, or what the device grants) and small host-memory writes go inside their
    /// work request; 0 = none, every write is read from registered memory (NCCL's default). On
    /// because without it message rate and decode steps measured slower on Soft-RoCE (README).
    pub use_inline: bool,
    /// `HALO_CONNECT_TIMEOUT_MS`: how long connect/accept wait for the peer (TCP connect plus
    /// the metadata exchange), 1..=86400000 ms; default 60000.
    pub connect_timeout: Duration,
    /// `NCCL_DEBUG`: true when it is `TRACE` (any case). NCCL owns this variable and validates
    /// it; the plugin only uses it to skip formatting trace messages nobody will print.
    pub trace: bool,
    /// `HALO_MAX_MSG_SIZE`: largest single RDMA WRITE, 4096..=2^31 bytes; default: the port's
    /// `max_msg_sz`. Larger messages are split. Lowering it exercises splitting in tests.
    pub max_msg_size: Option<u64>,
    /// `HALO_GPU_REG`: how GPU memory (`NCCL_PTR_CUDA`) is registered with the NIC: `auto`
    /// (default: dma-buf, else by address, else not at all, whichever the probe at `init` proves),
    /// `dmabuf` or `va` (only that strategy), `none` (no GPU memory; ROCm is not even loaded).
    pub gpu_reg: GpuReg,
    /// `HALO_EAGER_MAX`: largest message a receiver accepts on the eager path (bounce slots, no
    /// clear-to-send round trip), 0..=65536 bytes, rounded up to whole KiB; 0 turns the path off.
    /// Unset (`None`): [`AUTO_EAGER_MAX`] for a peer on another node, off for a peer on this
    /// node (see [`eager_max_for`] and the README's measurements).
    pub eager_max: Option<u32>,
    /// `HALO_STATS`: 1 = every send and receive comm logs one INFO line at close with its
    /// counters (messages, bytes, work requests, completions by kind, `test` calls, NULL
    /// requests, clear-to-send waits, eager sends) and per-message ratios; 0 (default) = off.
    pub stats: bool,
    /// `HALO_RECV_NAP_US`: once a receive comm's `test` has found nothing for
    /// `HALO_RECV_SPIN_US`, each further fruitless `test` sleeps this long (0..=1000 us; 0 = never).
    /// Unset (`None`): [`AUTO_RECV_NAP_US`] on a software RDMA device with the peer on another
    /// node, where the kernel's packet work needs the CPU the poller would take, else 0 (see
    /// [`recv_nap_for`]).
    pub recv_nap_us: Option<u32>,
    /// `HALO_RECV_SPIN_US`: fruitless polling before a receive naps (0..=1000000 us).
    pub recv_spin_us: u32,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            ib_hca: None,
            gid_index: None,
            roce_version: 2,
            addr_family: AddrFamily::V4,
            addr_range: None,
            timeout: 20,
            retry_cnt: 7,
            traffic_class: 0,
            service_level: 0,
            socket_ifname: None,
            qps_per_connection: None,
            split_data_on_qps: false,
            use_inline: true,
            connect_timeout: Duration::from_millis(60_000),
            trace: false,
            max_msg_size: None,
            gpu_reg: GpuReg::Auto,
            eager_max: None,
            stats: false,
            recv_nap_us: None,
            recv_spin_us: AUTO_RECV_SPIN_US,
        }
    }
}

/// The eager limit a receiver offers when `HALO_EAGER_MAX` is unset: the chunk of a 2-rank
/// all-reduce of a decode step (16 KiB per token on a 70B model, 8 KiB per rank).
pub const AUTO_EAGER_MAX: u32 = 8192;

/// The largest eager message a receiver offers on one connection: `HALO_EAGER_MAX` when set,
/// else [`AUTO_EAGER_MAX`] across nodes and 0 (off) when the peer is on this node. Across a wire
/// eager took 0.88–0.99 of the decode step without it and was level on latency and message
/// rate; with both ends on one node, where the receiver's copy competes with the sender for the
/// same CPUs, it cost 11 % of the 8-byte message rate (README, Performance).
pub fn eager_max_for(setting: Option<u32>, peer_on_this_node: bool) -> u32 {
    match setting {
        Some(max) => max,
        None if peer_on_this_node => 0,
        None => AUTO_EAGER_MAX,
    }
}

/// The nap of a receive on a software RDMA device when `HALO_RECV_NAP_US` is unset.
pub const AUTO_RECV_NAP_US: u32 = 20;
/// Fruitless polling before a receive naps, when `HALO_RECV_SPIN_US` is unset.
pub const AUTO_RECV_SPIN_US: u32 = 200;

/// When a receive comm's fruitless `test`s sleep, as (spin, nap) in us: `HALO_RECV_NAP_US` when
/// set, else [`AUTO_RECV_NAP_US`] on a software device (`software`) whose peer is on another node,
/// and never otherwise. Across two Soft-RoCE guests it took the stream from 0.29 to 0.39 Gb/s (the
/// poller had taken the CPU rxe's receive work needs); with both ends in one guest it cost up to
/// 11 % at 64 MiB, and RCCL does not use the net plugin within a node (README, Performance).
pub fn recv_nap_for(cfg: &PluginConfig, software: bool, peer_on_this_node: bool) -> (u32, u32) {
    let nap = match cfg.recv_nap_us {
        Some(us) => us,
        None if software && !peer_on_this_node => AUTO_RECV_NAP_US,
        None => 0,
    };
    (cfg.recv_spin_us, nap)
}

/// How GPU memory is registered (`HALO_GPU_REG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuReg {
    /// Probe dma-buf first, then registration by address.
    Auto,
    /// Only dma-buf (`hsa_amd_portable_export_dmabuf` + `ibv_reg_dmabuf_mr`).
    DmaBuf,
    /// Only `ibv_reg_mr` on the GPU address (needs a peer-memory client in the kernel).
    Va,
    /// No GPU memory registration.
    None,
}

/// Address family of the GID picked automatically (`NCCL_IB_ADDR_FAMILY`): `AF_INET` is
/// [`AddrFamily::V4`] (IPv4-mapped GIDs), `AF_INET6` [`AddrFamily::V6`] (native IPv6 GIDs).
pub use halo_ibverbs::AddrFamily;

/// A variable holds a value the plugin cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable.
    pub var: &'static str,
    /// Its value as found.
    pub value: String,
    /// What the variable accepts, or why this value is wrong.
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?} is invalid: expected {}",
            self.var, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(var: &'static str, value: &str, expected: impl Into<String>) -> Self {
        ConfigError {
            var,
            value: value.to_owned(),
            expected: expected.into(),
        }
    }
}

impl PluginConfig {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A value that is not valid UTF-8 cannot name a device, an interface or a number;
        // keep it (lossily) so that parsing rejects it with the variable's name.
        Self::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads the configuration through `get`, which returns a variable's value if it is set.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let d = PluginConfig::default();
        Ok(PluginConfig {
            ib_hca: get(ENV_IB_HCA).map(|v| HcaFilter::parse(&v)).transpose()?,
            gid_index: match get(ENV_GID_INDEX) {
                None => None,
                Some(v) => parse_gid_index(&v)?,
            },
            roce_version: match get(ENV_ROCE_VERSION) {
                None => d.roce_version,
                Some(v) => parse_int(ENV_ROCE_VERSION, &v, 1, 2)? as u8,
            },
            addr_family: match get(ENV_ADDR_FAMILY) {
                None => d.addr_family,
                Some(v) => parse_addr_family(&v)?,
            },
            addr_range: get(ENV_ADDR_RANGE)
                .map(|v| parse_addr_range(&v))
                .transpose()?,
            timeout: match get(ENV_TIMEOUT) {
                None => d.timeout,
                Some(v) => parse_int(ENV_TIMEOUT, &v, 1, 31)? as u8,
            },
            retry_cnt: match get(ENV_RETRY_CNT) {
                None => d.retry_cnt,
                Some(v) => parse_int(ENV_RETRY_CNT, &v, 0, 7)? as u8,
            },
            traffic_class: match get(ENV_TC) {
                None => d.traffic_class,
                Some(v) => parse_int(ENV_TC, &v, 0, 255)? as u8,
            },
            service_level: match get(ENV_SL) {
                None => d.service_level,
                Some(v) => parse_int(ENV_SL, &v, 0, 15)? as u8,
            },
            socket_ifname: get(ENV_SOCKET_IFNAME)
                .map(|v| IfFilter::parse(&v))
                .transpose()?,
            qps_per_connection: match get(ENV_QPS_PER_CONNECTION) {
                None => d.qps_per_connection,
                Some(v) => Some(parse_int(ENV_QPS_PER_CONNECTION, &v, 1, 16)? as u32),
            },
            split_data_on_qps: match get(ENV_SPLIT_DATA_ON_QPS) {
                None => d.split_data_on_qps,
                Some(v) => parse_int(ENV_SPLIT_DATA_ON_QPS, &v, 0, 1)? == 1,
            },
            use_inline: match get(ENV_USE_INLINE) {
                None => d.use_inline,
                Some(v) => parse_int(ENV_USE_INLINE, &v, 0, 1)? == 1,
            },
            connect_timeout: match get(ENV_CONNECT_TIMEOUT_MS) {
                None => d.connect_timeout,
                Some(v) => {
                    Duration::from_millis(
                        parse_int(ENV_CONNECT_TIMEOUT_MS, &v, 1, 86_400_000)? as u64
                    )
                }
            },
            trace: get(ENV_DEBUG).is_some_and(|v| v.trim().eq_ignore_ascii_case("TRACE")),
            max_msg_size: get(ENV_MAX_MSG_SIZE)
                .map(|v| parse_int(ENV_MAX_MSG_SIZE, &v, 4096, 1 << 31).map(|n| n as u64))
                .transpose()?,
            gpu_reg: match get(ENV_GPU_REG) {
                None => d.gpu_reg,
                Some(v) => parse_gpu_reg(&v)?,
            },
            eager_max: match get(ENV_EAGER_MAX) {
                None => d.eager_max,
                Some(v) => {
                    Some((parse_int(ENV_EAGER_MAX, &v, 0, 65536)? as u32).next_multiple_of(1024))
                }
            },
            stats: match get(ENV_STATS) {
                None => d.stats,
                Some(v) => parse_int(ENV_STATS, &v, 0, 1)? == 1,
            },
            recv_nap_us: get(ENV_RECV_NAP_US)
                .map(|v| parse_int(ENV_RECV_NAP_US, &v, 0, 1000).map(|n| n as u32))
                .transpose()?,
            recv_spin_us: match get(ENV_RECV_SPIN_US) {
                None => d.recv_spin_us,
                Some(v) => parse_int(ENV_RECV_SPIN_US, &v, 0, 1_000_000)? as u32,
            },
        })
    }

    /// Whether `ip` lies inside `NCCL_IB_ADDR_RANGE` (always true when it is unset).
    pub fn in_addr_range(&self, ip: IpAddr) -> bool {
        match self.addr_range {
            None => true,
            Some((net, len)) => prefix_contains(net, len, ip),
        }
    }
}

const ENV_IB_HCA: &str = "NCCL_IB_HCA";
const ENV_GID_INDEX: &str = "NCCL_IB_GID_INDEX";
const ENV_ROCE_VERSION: &str = "NCCL_IB_ROCE_VERSION_NUM";
const ENV_ADDR_FAMILY: &str = "NCCL_IB_ADDR_FAMILY";
const ENV_ADDR_RANGE: &str = "NCCL_IB_ADDR_RANGE";
const ENV_TIMEOUT: &str = "NCCL_IB_TIMEOUT";
const ENV_RETRY_CNT: &str = "NCCL_IB_RETRY_CNT";
const ENV_TC: &str = "NCCL_IB_TC";
const ENV_SL: &str = "NCCL_IB_SL";
const ENV_SOCKET_IFNAME: &str = "NCCL_SOCKET_IFNAME";
const ENV_QPS_PER_CONNECTION: &str = "NCCL_IB_QPS_PER_CONNECTION";
const ENV_SPLIT_DATA_ON_QPS: &str = "NCCL_IB_SPLIT_DATA_ON_QPS";
const ENV_USE_INLINE: &str = "NCCL_IB_USE_INLINE";
const ENV_CONNECT_TIMEOUT_MS: &str = "HALO_CONNECT_TIMEOUT_MS";
const ENV_MAX_MSG_SIZE: &str = "HALO_MAX_MSG_SIZE";
const ENV_EAGER_MAX: &str = "HALO_EAGER_MAX";
const ENV_STATS: &str = "HALO_STATS";
const ENV_RECV_NAP_US: &str = "HALO_RECV_NAP_US";
const ENV_RECV_SPIN_US: &str = "HALO_RECV_SPIN_US";
const ENV_DEBUG: &str = "NCCL_DEBUG";
/// Name of the variable that picks the GPU memory registration strategy.
pub const ENV_GPU_REG: &str = "HALO_GPU_REG";

fn parse_gpu_reg(value: &str) -> Result<GpuReg, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(GpuReg::Auto),
        "dmabuf" => Ok(GpuReg::DmaBuf),
        "va" => Ok(GpuReg::Va),
        "none" => Ok(GpuReg::None),
        _ => Err(ConfigError::new(
            ENV_GPU_REG,
            value,
            "auto, dmabuf, va or none",
        )),
    }
}

/// Parses a decimal integer in `min..=max` (surrounding blanks allowed).
fn parse_int(var: &'static str, value: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
    match value.trim().parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            var,
            value,
            format!("an integer in {min}..={max}"),
        )),
    }
}

fn parse_gid_index(value: &str) -> Result<Option<u32>, ConfigError> {
    // The verbs address handle stores the source GID index in 8 bits.
    match value.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(n) if (0..=255).contains(&n) => Ok(Some(n as u32)),
        _ => Err(ConfigError::new(
            ENV_GID_INDEX,
            value,
            "-1 (pick automatically) or a GID table index in 0..=255",
        )),
    }
}

fn parse_addr_family(value: &str) -> Result<AddrFamily, ConfigError> {
    match value.trim() {
        "AF_INET" => Ok(AddrFamily::V4),
        "AF_INET6" => Ok(AddrFamily::V6),
        _ => Err(ConfigError::new(
            ENV_ADDR_FAMILY,
            value,
            "AF_INET or AF_INET6",
        )),
    }
}

fn parse_addr_range(value: &str) -> Result<(IpAddr, u8), ConfigError> {
    let err = || {
        ConfigError::new(
            ENV_ADDR_RANGE,
            value,
            "an IPv4 network a.b.c.d/0..32 or an IPv6 network addr/0..128",
        )
    };
    let (addr, len) = value.trim().split_once('/').ok_or_else(err)?;
    let ip: IpAddr = addr.parse().map_err(|_| err())?;
    let len: u8 = len.parse().map_err(|_| err())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(err());
    }
    Ok((ip, len))
}

/// Whether the first `len` bits of `ip` equal those of `net` (different families never match).
fn prefix_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let (a, b, bits) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    (a >> shift) == (b >> shift)
}

/// How the names of a filter list are compared with a candidate name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameMatch {
    /// `mlx5` matches `mlx5_0` and `mlx5_1` (NCCL's default).
    Prefix,
    /// A leading `=`: names must be equal.
    Exact,
}

/// The common part of `NCCL_IB_HCA` and `NCCL_SOCKET_IFNAME`: a leading `^` turns the list
/// into an exclude list, a following `=` asks for exact names instead of prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListSpec<'a> {
    exclude: bool,
    mode: NameMatch,
    entries: Vec<&'a str>,
}

fn parse_list<'a>(
    var: &'static str,
    value: &'a str,
    what: &str,
) -> Result<ListSpec<'a>, ConfigError> {
    let mut rest = value.trim();
    let exclude = rest.starts_with('^');
    if exclude {
        rest = &rest[1..];
    }
    let mode = if rest.starts_with('=') {
        rest = &rest[1..];
        NameMatch::Exact
    } else {
        NameMatch::Prefix
    };
    // Stray blanks and empty entries (a trailing comma) are harmless; a list naming nothing
    // at all is almost certainly a mistake in a job script.
    let entries: Vec<&str> = rest
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if entries.is_empty() {
        return Err(ConfigError::new(
            var,
            value,
            format!("a comma-separated list of {what}, optionally starting with '^' (exclude) and/or '=' (exact names)"),
        ));
    }
    Ok(ListSpec {
        exclude,
        mode,
        entries,
    })
}

fn name_matches(mode: NameMatch, pattern: &str, name: &str) -> bool {
    match mode {
        NameMatch::Prefix => name.starts_with(pattern),
        NameMatch::Exact => name == pattern,
    }
}

/// One entry of `NCCL_IB_HCA`: a device name (or prefix) and optionally a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcaEntry {
    /// Device name, or its prefix unless the filter asks for exact names.
    pub name: String,
    /// Only this port of the device; `None` = every port.
    pub port: Option<u8>,
}

/// The parsed value of `NCCL_IB_HCA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcaFilter {
    spec: String,
    exclude: bool,
    mode: NameMatch,
    entries: Vec<HcaEntry>,
}

impl HcaFilter {
    /// Parses `[^][=]dev[:port][,dev[:port]...]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let list = parse_list(ENV_IB_HCA, s, "RDMA devices dev[:port]")?;
        let entries = list
            .entries
            .iter()
            .map(|e| match e.split_once(':') {
                None => Ok(HcaEntry {
                    name: (*e).to_owned(),
                    port: None,
                }),
                Some((name, port)) => match port.trim().parse::<u8>() {
                    Ok(p) if p >= 1 && !name.trim().is_empty() => Ok(HcaEntry {
                        name: name.trim().to_owned(),
                        port: Some(p),
                    }),
                    _ => Err(ConfigError::new(
                        ENV_IB_HCA,
                        s,
                        format!("entries dev or dev:port with a port number in 1..=255, not {e:?}"),
                    )),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HcaFilter {
            spec: s.trim().to_owned(),
            exclude: list.exclude,
            mode: list.mode,
            entries,
        })
    }

    /// Whether port `port` of device `dev` may be used.
    pub fn matches(&self, dev: &str, port: u8) -> bool {
        let listed = self
            .entries
            .iter()
            .any(|e| name_matches(self.mode, &e.name, dev) && e.port.unwrap_or(port) == port);
        listed != self.exclude
    }

    /// The entries as listed.
    pub fn entries(&self) -> &[HcaEntry] {
        &self.entries
    }
}

impl fmt::Display for HcaFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ENV_IB_HCA}={}", self.spec)
    }
}

/// The parsed value of `NCCL_SOCKET_IFNAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfFilter {
    spec: String,
    exclude: bool,
    mode: NameMatch,
    names: Vec<String>,
}

impl IfFilter {
    /// Parses `[^][=]ifname[,ifname...]`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let list = parse_list(ENV_SOCKET_IFNAME, s, "network interface names")?;
        Ok(IfFilter {
            spec: s.trim().to_owned(),
            exclude: list.exclude,
            mode: list.mode,
            names: list.entries.iter().map(|e| (*e).to_owned()).collect(),
        })
    }

    /// Whether interface `ifname` may be used.
    pub fn matches(&self, ifname: &str) -> bool {
        let listed = self
            .names
            .iter()
            .any(|n| name_matches(self.mode, n, ifname));
        listed != self.exclude
    }
}

impl fmt::Display for IfFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ENV_SOCKET_IFNAME}={}", self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn with(vars: &[(&str, &str)]) -> Result<PluginConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        PluginConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let c = with(&[]).unwrap();
        assert_eq!(c, PluginConfig::default());
        assert_eq!(c.roce_version, 2);
        assert_eq!(c.timeout, 20);
        assert_eq!(c.retry_cnt, 7);
        assert_eq!(c.qps_per_connection, None);
        assert_eq!(c.connect_timeout, Duration::from_secs(60));
        assert_eq!(c.addr_family, AddrFamily::V4);
    }

    #[test]
    fn receives_nap_on_software_devices_across_nodes_unless_set() {
        let c = with(&[]).unwrap();
        let (auto, spin) = (AUTO_RECV_NAP_US, AUTO_RECV_SPIN_US);
        const { assert!(AUTO_RECV_NAP_US > 0) };
        // (software device, peer on this node, nap)
        for (software, local, nap) in [
            (true, false, auto),
            (true, true, 0),
            (false, false, 0),
            (false, true, 0),
        ] {
            assert_eq!(recv_nap_for(&c, software, local), (spin, nap));
        }
        let c = with(&[(ENV_RECV_NAP_US, "0")]).unwrap();
        assert_eq!(recv_nap_for(&c, true, false).1, 0);
        let c = with(&[(ENV_RECV_NAP_US, "30"), (ENV_RECV_SPIN_US, "5000")]).unwrap();
        for (software, local) in [(true, false), (true, true), (false, false), (false, true)] {
            assert_eq!(recv_nap_for(&c, software, local), (5000, 30));
        }
    }

    #[test]
    fn eager_is_on_across_nodes_unless_set() {
        let unset = with(&[]).unwrap().eager_max;
        assert_eq!(unset, None);
        assert_eq!(eager_max_for(unset, false), AUTO_EAGER_MAX);
        assert_eq!(eager_max_for(unset, true), 0);
        // A set value holds for every peer, 0 included.
        for (v, want) in [("0", 0), ("8192", 8192), ("5000", 5120), ("65536", 65536)] {
            let set = with(&[(ENV_EAGER_MAX, v)]).unwrap().eager_max;
            assert_eq!(set, Some(want), "{v}");
            assert_eq!(eager_max_for(set, false), want, "{v}");
            assert_eq!(eager_max_for(set, true), want, "{v}");
        }
        assert!(with(&[(ENV_EAGER_MAX, "65537")]).is_err());
        assert!(with(&[(ENV_EAGER_MAX, "8k")]).is_err());
    }

    #[test]
    fn empty_values_count_as_unset() {
        let names = [
            ENV_IB_HCA,
            ENV_GID_INDEX,
            ENV_ROCE_VERSION,
            ENV_ADDR_FAMILY,
            ENV_ADDR_RANGE,
            ENV_TIMEOUT,
            ENV_RETRY_CNT,
            ENV_TC,
            ENV_SL,
            ENV_SOCKET_IFNAME,
            ENV_QPS_PER_CONNECTION,
            ENV_SPLIT_DATA_ON_QPS,
            ENV_USE_INLINE,
            ENV_CONNECT_TIMEOUT_MS,
            ENV_DEBUG,
            ENV_GPU_REG,
            ENV_EAGER_MAX,
            ENV_STATS,
            ENV_RECV_NAP_US,
            ENV_RECV_SPIN_US,
        ];
        for name in names {
            for empty in ["", "  "] {
                assert_eq!(
                    with(&[(name, empty)]).unwrap(),
                    PluginConfig::default(),
                    "{name}={empty:?}"
                );
            }
        }
    }

    /// (variable, value, extracted field as i64 or None for "must be rejected")
    type IntCase = (&'static str, &'static str, Option<i64>);

    fn int_field(c: &PluginConfig, var: &str) -> i64 {
        match var {
            ENV_ROCE_VERSION => c.roce_version.into(),
            ENV_TIMEOUT => c.timeout.into(),
            ENV_RETRY_CNT => c.retry_cnt.into(),
            ENV_TC => c.traffic_class.into(),
            ENV_SL => c.service_level.into(),
            ENV_QPS_PER_CONNECTION => c.qps_per_connection.map_or(-1, i64::from),
            ENV_SPLIT_DATA_ON_QPS => c.split_data_on_qps.into(),
            ENV_USE_INLINE => c.use_inline.into(),
            ENV_STATS => c.stats.into(),
            ENV_RECV_NAP_US => c.recv_nap_us.map_or(-1, i64::from),
            ENV_RECV_SPIN_US => c.recv_spin_us.into(),
            ENV_CONNECT_TIMEOUT_MS => c.connect_timeout.as_millis() as i64,
            ENV_GID_INDEX => c.gid_index.map_or(-1, i64::from),
            _ => unreachable!("{var}"),
        }
    }

    #[test]
    fn integer_variables() {
        let cases: &[IntCase] = &[
            (ENV_ROCE_VERSION, "1", Some(1)),
            (ENV_ROCE_VERSION, "2", Some(2)),
            (ENV_ROCE_VERSION, "0", None),
            (ENV_ROCE_VERSION, "3", None),
            (ENV_ROCE_VERSION, "v2", None),
            (ENV_TIMEOUT, "1", Some(1)),
            (ENV_TIMEOUT, " 31 ", Some(31)),
            (ENV_TIMEOUT, "0", None),
            (ENV_TIMEOUT, "32", None),
            (ENV_TIMEOUT, "14.5", None),
            (ENV_RETRY_CNT, "0", Some(0)),
            (ENV_RETRY_CNT, "7", Some(7)),
            (ENV_RETRY_CNT, "8", None),
            (ENV_RETRY_CNT, "-1", None),
            (ENV_TC, "0", Some(0)),
            (ENV_TC, "106", Some(106)),
            (ENV_TC, "255", Some(255)),
            (ENV_TC, "256", None),
            (ENV_TC, "0x20", None),
            (ENV_SL, "15", Some(15)),
            (ENV_SL, "16", None),
            (ENV_QPS_PER_CONNECTION, "1", Some(1)),
            (ENV_QPS_PER_CONNECTION, "16", Some(16)),
            (ENV_QPS_PER_CONNECTION, "0", None),
            (ENV_QPS_PER_CONNECTION, "17", None),
            (ENV_SPLIT_DATA_ON_QPS, "0", Some(0)),
            (ENV_SPLIT_DATA_ON_QPS, "1", Some(1)),
            (ENV_SPLIT_DATA_ON_QPS, "2", None),
            (ENV_SPLIT_DATA_ON_QPS, "yes", None),
            (ENV_USE_INLINE, "0", Some(0)),
            (ENV_USE_INLINE, "1", Some(1)),
            (ENV_USE_INLINE, "2", None),
            (ENV_USE_INLINE, "on", None),
            (ENV_STATS, "0", Some(0)),
            (ENV_STATS, " 1 ", Some(1)),
            (ENV_STATS, "2", None),
            (ENV_STATS, "on", None),
            (ENV_RECV_NAP_US, "0", Some(0)),
            (ENV_RECV_NAP_US, "50", Some(50)),
            (ENV_RECV_NAP_US, "1000", Some(1000)),
            (ENV_RECV_NAP_US, "1001", None),
            (ENV_RECV_NAP_US, "-1", None),
            (ENV_RECV_SPIN_US, "0", Some(0)),
            (ENV_RECV_SPIN_US, "1000000", Some(1_000_000)),
            (ENV_RECV_SPIN_US, "1000001", None),
            (ENV_RECV_SPIN_US, "1ms", None),
            (ENV_CONNECT_TIMEOUT_MS, "1", Some(1)),
            (ENV_CONNECT_TIMEOUT_MS, "250", Some(250)),
            (ENV_CONNECT_TIMEOUT_MS, "86400000", Some(86_400_000)),
            (ENV_CONNECT_TIMEOUT_MS, "0", None),
            (ENV_CONNECT_TIMEOUT_MS, "86400001", None),
            (ENV_CONNECT_TIMEOUT_MS, "99999999999999999999999", None),
            (ENV_GID_INDEX, "-1", Some(-1)),
            (ENV_GID_INDEX, "0", Some(0)),
            (ENV_GID_INDEX, "3", Some(3)),
            (ENV_GID_INDEX, "255", Some(255)),
            (ENV_GID_INDEX, "256", None),
            (ENV_GID_INDEX, "-2", None),
            (ENV_GID_INDEX, "auto", None),
        ];
        for &(var, value, expect) in cases {
            let got = with(&[(var, value)]);
            match expect {
                Some(n) => assert_eq!(int_field(&got.unwrap(), var), n, "{var}={value:?}"),
                None => {
                    let e = got.expect_err(&format!("{var}={value:?} must be rejected"));
                    assert_eq!(e.var, var);
                    assert_eq!(e.value, value);
                    let text = e.to_string();
                    assert!(text.contains(var) && text.contains(value), "{text}");
                }
            }
        }
    }

    #[test]
    fn error_text_says_what_is_accepted() {
        let e = with(&[(ENV_TIMEOUT, "40")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "NCCL_IB_TIMEOUT=\"40\" is invalid: expected an integer in 1..=31"
        );
    }

    #[test]
    fn addr_family() {
        assert_eq!(
            with(&[(ENV_ADDR_FAMILY, "AF_INET6")]).unwrap().addr_family,
            AddrFamily::V6
        );
        assert_eq!(
            with(&[(ENV_ADDR_FAMILY, "AF_INET")]).unwrap().addr_family,
            AddrFamily::V4
        );
        for bad in ["INET6", "af_inet", "AF_UNIX", "6"] {
            let e = with(&[(ENV_ADDR_FAMILY, bad)]).unwrap_err();
            assert_eq!(e.var, ENV_ADDR_FAMILY);
        }
    }

    #[test]
    fn addr_range() {
        let ok: &[(&str, IpAddr, u8)] = &[
            ("10.1.0.0/16", Ipv4Addr::new(10, 1, 0, 0).into(), 16),
            ("192.168.5.7/32", Ipv4Addr::new(192, 168, 5, 7).into(), 32),
            ("0.0.0.0/0", Ipv4Addr::UNSPECIFIED.into(), 0),
            ("fd00::/8", "fd00::".parse::<Ipv6Addr>().unwrap().into(), 8),
            (
                "2001:db8::1/128",
                "2001:db8::1".parse::<Ipv6Addr>().unwrap().into(),
                128,
            ),
        ];
        for &(v, ip, len) in ok {
            assert_eq!(
                with(&[(ENV_ADDR_RANGE, v)]).unwrap().addr_range,
                Some((ip, len)),
                "{v}"
            );
        }
        for bad in [
            "10.1.0.0",
            "10.1.0.0/33",
            "10.1.0/16",
            "fd00::/129",
            "/8",
            "10.0.0.0/-1",
            "host/8",
        ] {
            assert_eq!(
                with(&[(ENV_ADDR_RANGE, bad)]).unwrap_err().var,
                ENV_ADDR_RANGE,
                "{bad}"
            );
        }
    }

    #[test]
    fn addr_range_membership() {
        let c = with(&[(ENV_ADDR_RANGE, "10.1.0.0/16")]).unwrap();
        assert!(c.in_addr_range(Ipv4Addr::new(10, 1, 200, 3).into()));
        assert!(!c.in_addr_range(Ipv4Addr::new(10, 2, 0, 1).into()));
        assert!(!c.in_addr_range("fd00::1".parse().unwrap()));
        let c = with(&[(ENV_ADDR_RANGE, "fd00:1::/32")]).unwrap();
        assert!(c.in_addr_range("fd00:1:ffff::9".parse().unwrap()));
        assert!(!c.in_addr_range("fd00:2::9".parse().unwrap()));
        let c = with(&[(ENV_ADDR_RANGE, "0.0.0.0/0")]).unwrap();
        assert!(c.in_addr_range(Ipv4Addr::new(1, 2, 3, 4).into()));
        assert!(with(&[]).unwrap().in_addr_range("::1".parse().unwrap()));
    }

    #[test]
    fn gpu_reg_strategies() {
        assert_eq!(with(&[]).unwrap().gpu_reg, GpuReg::Auto);
        for (v, want) in [
            ("auto", GpuReg::Auto),
            ("DMABUF", GpuReg::DmaBuf),
            (" va ", GpuReg::Va),
            ("none", GpuReg::None),
        ] {
            assert_eq!(with(&[(ENV_GPU_REG, v)]).unwrap().gpu_reg, want, "{v}");
        }
        let e = with(&[(ENV_GPU_REG, "peermem")]).unwrap_err();
        assert_eq!(e.var, ENV_GPU_REG);
        assert!(e.to_string().contains("auto, dmabuf, va or none"), "{e}");
    }

    #[test]
    fn trace_follows_nccl_debug() {
        assert!(with(&[(ENV_DEBUG, "TRACE")]).unwrap().trace);
        assert!(with(&[(ENV_DEBUG, "trace")]).unwrap().trace);
        assert!(!with(&[(ENV_DEBUG, "INFO")]).unwrap().trace);
        // NCCL decides what its own variable may hold.
        assert!(!with(&[(ENV_DEBUG, "bogus")]).unwrap().trace);
    }

    #[test]
    fn hca_filter_semantics() {
        // (filter, device, port, expected)
        let cases: &[(&str, &str, u8, bool)] = &[
            ("mlx5", "mlx5_0", 1, true),
            ("mlx5", "mlx5_1", 2, true),
            ("mlx5", "rxe0", 1, false),
            ("mlx5_0", "mlx5_0", 1, true),
            ("mlx5_0", "mlx5_1", 1, false),
            ("=mlx5_0", "mlx5_0", 1, true),
            ("=mlx5", "mlx5_0", 1, false),
            ("^mlx5_1", "mlx5_0", 1, true),
            ("^mlx5_1", "mlx5_1", 1, false),
            ("^mlx5_1", "rxe0", 1, true),
            ("^mlx5", "mlx5_1", 1, false),
            ("^=mlx5", "mlx5_1", 1, true),
            ("^=mlx5_1", "mlx5_1", 1, false),
            ("mlx5_0:1", "mlx5_0", 1, true),
            ("mlx5_0:1", "mlx5_0", 2, false),
            ("mlx5_0:1,mlx5_1:2", "mlx5_1", 2, true),
            ("mlx5_0:1,mlx5_1:2", "mlx5_1", 1, false),
            ("^mlx5_0:1", "mlx5_0", 2, true),
            ("^mlx5_0:1", "mlx5_0", 1, false),
            ("rxe0, irdma", "irdma0", 1, true),
            ("rxe0,", "rxe0", 1, true),
        ];
        for &(spec, dev, port, want) in cases {
            let f = HcaFilter::parse(spec).unwrap();
            assert_eq!(f.matches(dev, port), want, "{spec:?} vs {dev}:{port}");
        }
    }

    #[test]
    fn hca_filter_entries_and_errors() {
        let f = HcaFilter::parse("=mlx5_0:1,rxe0").unwrap();
        assert_eq!(
            f.entries(),
            &[
                HcaEntry {
                    name: "mlx5_0".into(),
                    port: Some(1)
                },
                HcaEntry {
                    name: "rxe0".into(),
                    port: None
                }
            ]
        );
        assert_eq!(f.to_string(), "NCCL_IB_HCA==mlx5_0:1,rxe0");
        for bad in [
            "^",
            "=",
            "^=",
            ",",
            "mlx5_0:",
            "mlx5_0:x",
            "mlx5_0:0",
            "mlx5_0:256",
            ":1",
        ] {
            let e = HcaFilter::parse(bad).expect_err(bad);
            assert_eq!(e.var, ENV_IB_HCA);
        }
        assert_eq!(
            with(&[(ENV_IB_HCA, "mlx5_0:9999")]).unwrap_err().var,
            ENV_IB_HCA
        );
    }

    #[test]
    fn socket_ifname_semantics() {
        let cases: &[(&str, &str, bool)] = &[
            ("eth", "eth0", true),
            ("eth", "enp1s0", false),
            ("enp1s0,eth", "enp1s0", true),
            ("=eth0", "eth0", true),
            ("=eth0", "eth01", false),
            ("^docker,lo", "docker0", false),
            ("^docker,lo", "lo", false),
            ("^docker,lo", "enp195s0", true),
            ("^=eth0", "eth0", false),
            ("^=eth0", "eth01", true),
        ];
        for &(spec, name, want) in cases {
            let f = IfFilter::parse(spec).unwrap();
            assert_eq!(f.matches(name), want, "{spec:?} vs {name}");
        }
        assert!(IfFilter::parse("^").is_err());
        let c = with(&[(ENV_SOCKET_IFNAME, "=enp1s0")]).unwrap();
        let f = c.socket_ifname.unwrap();
        assert!(f.matches("enp1s0"));
        assert_eq!(f.to_string(), "NCCL_SOCKET_IFNAME==enp1s0");
    }
}
