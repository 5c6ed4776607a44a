//! Builds the C layout probe (`tests/c/layout_probe.c`) against `include/rccl_net.h`
//! with the target C compiler, so `tests/abi_layout.rs` can compare the C view of the
//! ABI with the `halo-ffi` mirror. The probe path reaches the test as
//! `HALO_LAYOUT_PROBE`.
//!
//! Also builds the stand-in ROCm runtime of the GPU-direct tests (`tests/c/fake_rocm.c`) into
//! `$OUT_DIR/fake-rocm/`, under the library names the plugin loads; the tests find the directory
//! as `HALO_FAKE_ROCM_DIR` and put it on `LD_LIBRARY_PATH` of a child process. A second copy
//! with another identity (HIP version, GPU name) is built under a wheel-style file name, as
//! Python packages bundle their own HIP runtime; its path reaches the tests as
//! `HALO_FAKE_ROCM_BUNDLED`. Neither is ever part of the plugin.

use std::path::PathBuf;
use std::process::Command;

const HEADER: &str = "include/rccl_net.h";
const PROBE_SRC: &str = "tests/c/layout_probe.c";
const FAKE_ROCM_SRC: &str = "tests/c/fake_rocm.c";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={HEADER}");
    println!("cargo:rerun-if-changed={PROBE_SRC}");
    println!("cargo:rerun-if-changed={FAKE_ROCM_SRC}");

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

    build_fake_rocm(&compiler, &manifest_dir, &out_dir);
}

/// Identity of the bundled copy: the HIP version it reports and its GPU agent's name.
const BUNDLED_HIP_VERSION: &str = "70100042";
const BUNDLED_GPU_NAME: &str = "gfx-bundled";

fn compile_fake_rocm(
    compiler: &cc::Tool,
    manifest_dir: &std::path::Path,
    out: &std::path::Path,
    defines: &[String],
) {
    let mut cmd = compiler.to_command();
    if compiler.is_like_gnu() || compiler.is_like_clang() {
        cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror"]);
    }
    cmd.args(defines)
        .args(["-shared", "-fPIC"])
        .arg(manifest_dir.join(FAKE_ROCM_SRC))
        .arg("-o")
        .arg(out);
    run(cmd, "compiling tests/c/fake_rocm.c");
}

/// One shared object, reachable as `libamdhip64.so` and `libhsa-runtime64.so.1` (symlinks, so the
/// loader maps it once and HIP and HSA share its allocation table); and the bundled copy.
fn build_fake_rocm(compiler: &cc::Tool, manifest_dir: &std::path::Path, out_dir: &std::path::Path) {
    let dir = out_dir.join("fake-rocm");
    std::fs::create_dir_all(&dir).expect("creating fake-rocm dir");
    let lib = dir.join("libfake-rocm.so");
    compile_fake_rocm(compiler, manifest_dir, &lib, &[]);
    for name in ["libamdhip64.so", "libhsa-runtime64.so.1"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libfake-rocm.so", &link)
            .unwrap_or_else(|e| panic!("linking {}: {e}", link.display()));
    }
    println!("cargo:rustc-env=HALO_FAKE_ROCM_DIR={}", dir.display());

    let bundled_dir = out_dir.join("fake-rocm-bundled");
    std::fs::create_dir_all(&bundled_dir).expect("creating fake-rocm-bundled dir");
    let bundled = bundled_dir.join("libamdhip64-7f3c9a1e.so.6");
    compile_fake_rocm(
        compiler,
        manifest_dir,
        &bundled,
        &[
            format!("-DFAKE_ROCM_HIP_VERSION={BUNDLED_HIP_VERSION}"),
            format!("-DFAKE_ROCM_GPU_NAME=\"{BUNDLED_GPU_NAME}\""),
        ],
    );
    println!(
        "cargo:rustc-env=HALO_FAKE_ROCM_BUNDLED={}",
        bundled.display()
    );
    println!("cargo:rustc-env=HALO_FAKE_ROCM_BUNDLED_VERSION={BUNDLED_HIP_VERSION}");
    println!("cargo:rustc-env=HALO_FAKE_ROCM_BUNDLED_GPU={BUNDLED_GPU_NAME}");
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
