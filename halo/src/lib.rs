//! The `halo` harness for Strix Halo RoCE v2 clusters: node checks (`doctor`), the Ray cluster
//! (`cluster`), the network path (`bench`), any net plugin's conformance (`conformance`), vLLM (`serve`, `bench-serve`) and the container (`container`).

pub mod bench;
pub mod cluster;
pub mod collective;
pub mod conformance;
pub mod container;
pub mod doctor;
pub mod hf;
pub mod port;
pub mod process;
pub mod report;
pub mod serve;
pub mod sysroot;
pub mod vllm;
