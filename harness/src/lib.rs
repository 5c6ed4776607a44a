//! halo-harness: the host-side tooling around the halo net plugin, shared by the `halo` command,
//! the root package's integration tests and its examples.
//!
//! - [`driver`]: loads a built plugin `.so` and calls it through its C ABI, as RCCL does;
//! - [`log`]: the one logger shim handed to the plugin's `init`;
//! - [`bench`]: the network benchmark engine (latency, bandwidth, message rate, all-reduce,
//!   connection scaling), its line control channel and the perftest runner and parser;
//! - [`conformance`]: the conformance run of any net plugin (seeded traffic between two
//!   processes, every byte and size checked), behind `examples/conformance` and `halo conformance`;
//! - [`artifacts`]: the built plugin library and examples, built on demand for tests.

pub mod artifacts;
pub mod bench;
pub mod conformance;
pub mod driver;
pub mod log;
pub mod rng;
