//! Builds the logger entry point (`c/logger.c`, see `src/log.rs`) into the library, and the test
//! plugin `c/late_table.c` into `$OUT_DIR/liblate_table.so` for the driver's unit tests, which
//! find it as `HALO_LATE_TABLE_PLUGIN`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=c/logger.c");
    println!("cargo:rerun-if-changed=c/late_table.c");
    println!("cargo:rerun-if-changed=../include/rccl_net.h");

    cc::Build::new()
        .file("c/logger.c")
        .warnings(true)
        .compile("halo_harness_logger");

    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let so = out.join("liblate_table.so");
    let status = cc::Build::new()
        .get_compiler()
        .to_command()
        .args(["-shared", "-fPIC", "-Wall", "-O1", "-I"])
        .arg(manifest.join("../include"))
        .arg("-o")
        .arg(&so)
        .arg(manifest.join("c/late_table.c"))
        .status()
        .expect("cannot run the C compiler");
    assert!(status.success(), "building c/late_table.c failed");
    println!("cargo:rustc-env=HALO_LATE_TABLE_PLUGIN={}", so.display());
}
