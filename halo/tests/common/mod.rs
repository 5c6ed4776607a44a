//! Helpers shared by the integration tests: running the built `halo`, fixture trees, and
//! copies of them with faults applied.

#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built `halo`, blind to any container this machine's user recorded with
/// `halo container create` (tests that want a record set HALO_STATE_DIR themselves).
pub fn halo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo"));
    cmd.env("HALO_STATE_DIR", "/nonexistent/halo-test-state");
    cmd
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn good_tree() -> PathBuf {
    fixtures().join("doctor/good")
}

pub fn good_env() -> PathBuf {
    fixtures().join("doctor/good.env")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Copies a tree, keeping symlinks as symlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let dest = to.join(entry.file_name());
        if kind.is_symlink() {
            symlink(fs::read_link(entry.path()).unwrap(), &dest).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// A writable copy of the good node, to break one thing in.
pub struct Overlay {
    pub dir: tempfile::TempDir,
}

impl Overlay {
    pub fn of_good() -> Self {
        Self::of("good")
    }

    /// A copy of the captured tree `tests/fixtures/doctor/<name>`.
    pub fn of(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixtures().join("doctor").join(name), dir.path());
        Overlay { dir }
    }

    /// Makes `rel` a symlink to `target` (replacing what was there).
    pub fn link(&self, rel: &str, target: &str) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        if p.symlink_metadata().is_ok() {
            if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p).unwrap();
            } else {
                fs::remove_file(&p).unwrap();
            }
        }
        symlink(target, p).unwrap();
        self
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    pub fn write(&self, rel: &str, text: &str) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        self
    }

    pub fn remove(&self, rel: &str) -> &Self {
        let p = self.path(rel);
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
        self
    }

    /// Replaces `from` with `to` in a file.
    pub fn edit(&self, rel: &str, from: &str, to: &str) -> &Self {
        let p = self.path(rel);
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{rel} does not contain {from:?}");
        fs::write(p, text.replacen(from, to, 1)).unwrap();
        self
    }
}

#[allow(unused_imports)] // each test binary uses a different subset
pub use cluster::{free_port, Sshd};

/// The tests' OpenSSH server ([`cluster::start_sshd`]); `None` when sshd is not installed.
pub fn sshd_if_installed(dir: &Path) -> Option<Sshd> {
    let sshd = Path::new("/usr/sbin/sshd");
    sshd.is_file().then(|| cluster::start_sshd(sshd, dir))
}
