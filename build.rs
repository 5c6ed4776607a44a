//! Builds the C layout probe (`tests/c/layout_probe.c`) against `include/rccl_net.h`
//! with the target C compiler, so `tests/abi_layout.rs` can compare the C view of the
//! ABI with the `halo-ffi` mirror. The probe path reaches the test as
//! `HALO_LAYOUT_PROBE`.

use std::path::PathBuf;
use std::process::Command;

const HEADER: &str = "include/rccl_net.h";
const PROBE_SRC: &str = "tests/c/layout_probe.c";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={HEADER}");
    println!("cargo:rerun-if-changed={PROBE_SRC}");

    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let include_dir = manifest_dir.join("include");
    let probe = out_dir.join("layout_probe");

    let compiler = cc::Build::new().get_compiler();
    let gnu_like = compiler.is_like_gnu() || compiler.is_like_clang();

    // The header promises plain C99 and self-containment; check both on its own.
    if gnu_like {
        let mut cmd = compiler.to_command();
        cmd.args([
            "-std=c99",
            "-pedantic-errors",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .args(["-fsyntax-only", "-x", "c"])
        .arg(manifest_dir.join(HEADER));
        run(cmd, "checking include/rccl_net.h as standalone C99");
    }

    // The probe itself needs C11 for _Alignof.
    let mut cmd = compiler.to_command();
    if gnu_like {
        cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror"]);
    }
    cmd.arg("-I")
        .arg(&include_dir)
        .arg(manifest_dir.join(PROBE_SRC))
        .arg("-o")
        .arg(&probe);
    run(cmd, "compiling tests/c/layout_probe.c");

    println!("cargo:rustc-env=HALO_LAYOUT_PROBE={}", probe.display());
}

fn run(mut cmd: Command, what: &str) {
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start C compiler {:?}: {e}",
            cmd.get_program()
        )
    });
    if !output.status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        panic!(
            "{what} failed ({}):\n{} {}\n{}{}",
            output.status,
            cmd.get_program().to_string_lossy(),
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
