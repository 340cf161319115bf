//! Builds the freestanding built-in guest (`guest/` at the workspace root) with its own cargo
//! invocation, flags and target directory, and hands the ELF to `lib.rs` to embed.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir
        .join("../../guest")
        .canonicalize()
        .expect("guest/ exists");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    // The guest's flags come from guest/.cargo/config.toml and guest/build.rs; flags meant for
    // the workspace (sanitizers, coverage, a --target) must not leak into it.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the built-in guest");
    assert!(
        status.success(),
        "building the built-in guest failed: {status}"
    );

    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/ferry-guest");
    std::fs::copy(&elf, out_dir.join("ferry-guest.elf")).expect("copy guest ELF");

    println!("cargo:rerun-if-changed={}", guest_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("Cargo.lock").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("linker.ld").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("build.rs").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join(".cargo/config.toml").display()
    );
    for dep in ["guest-abi", "nvme-spec", "pvrdma-abi", "rdma-wire"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join("../").join(dep).join("src").display()
        );
    }
}
