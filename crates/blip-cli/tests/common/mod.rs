//! What the tests of the `blip` binary share: the committed fixtures, running the binary, and
//! reading its output.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The images of every expected-output file, in its order.
pub const IMAGES: [&str; 3] = ["chelsea.png", "astronaut.png", "rocket.jpg"];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../blip/tests/fixtures")
}

pub fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

pub fn image(name: &str) -> String {
    fixtures().join("images-model").join(name).display().to_string()
}

pub fn images() -> Vec<String> {
    IMAGES.map(image).to_vec()
}

/// The binary with `args`, never reaching the network.
pub fn blip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blip")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("runs")
}

/// `blip` with `args` followed by `inputs`.
pub fn blip_on(args: &[&str], inputs: &[String]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(inputs.iter().map(String::as_str));
    blip(&all)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// The JSONL records printed, whatever the exit code.
pub fn jsonl(out: &Output) -> Vec<Value> {
    stdout(out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A fresh folder under the target directory's scratch space.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("blip-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
