//! halo-rdma: cross-crate tests, examples and benchmarks live in this package.
pub mod bench;
pub mod driver;
