//! Builds the logger entry point (`c/logger.c`, see `src/log.rs`) into the library.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=c/logger.c");

    cc::Build::new()
        .file("c/logger.c")
        .warnings(true)
        .compile("halo_harness_logger");
}
