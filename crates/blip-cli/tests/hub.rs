//! Downloading by repo id: `blip` against a local stand-in for the Hugging Face Hub (the
//! endpoints hf-hub uses: repo info, and ranged file downloads with etag and commit headers).
//! Files land in the standard cache under HF_HOME and then work offline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPO: &str = "tiny/caption";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../blip/tests/fixtures")
}

/// Serves the files of `dir` as the repo `REPO` on a local port; returns the endpoint URL.
fn serve(dir: &Path) -> String {
    let files: HashMap<String, Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            respond(stream.unwrap(), &files);
        }
    });
    endpoint
}

fn respond(mut stream: TcpStream, files: &HashMap<String, Vec<u8>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_start = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
            break;
        }
        if let Some(range) = header.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_start = range.split('-').next().unwrap().trim().parse().unwrap();
        }
    }
    let info_path = format!("/api/models/{REPO}/revision/main");
    let file_prefix = format!("/{REPO}/resolve/main/");
    let (status, headers, body) = if path == info_path {
        let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string().into_bytes();
        ("200 OK", String::new(), body)
    } else if let Some(data) = path.strip_prefix(&file_prefix).and_then(|f| files.get(f)) {
        let headers = format!(
            "x-repo-commit: {COMMIT}\r\netag: \"{:x}-{}\"\r\nContent-Range: bytes {range_start}-{}/{}\r\n",
            data.len(),
            path.len(),
            data.len() - 1,
            data.len()
        );
        ("206 Partial Content", headers, data[range_start..].to_vec())
    } else {
        ("404 Not Found", String::new(), b"not found".to_vec())
    };
    let head = format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
}

fn blip(hf_home: &Path, env: &[(&str, &str)], model: &str) -> Output {
    let image = fixtures().join("images-model/chelsea.png");
    let mut command = Command::new(env!("CARGO_BIN_EXE_blip"));
    command.args(["caption", "--model", model, "--format", "jsonl"]).arg(image).env("HF_HOME", hf_home);
    command.env_remove("HF_HUB_OFFLINE").env_remove("HF_TOKEN");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

#[test]
fn downloads_into_the_cache_then_works_offline() {
    let endpoint = serve(&fixtures().join("models/tiny-caption-bin"));
    let hf_home = std::env::temp_dir().join(format!("blip-hub-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&hf_home);

    let online = blip(&hf_home, &[("HF_ENDPOINT", &endpoint)], REPO);
    assert!(online.status.success(), "{}", String::from_utf8_lossy(&online.stderr));
    let snapshot = hf_home.join("hub/models--tiny--caption/snapshots").join(COMMIT);
    for file in ["config.json", "preprocessor_config.json", "tokenizer.json", "pytorch_model.bin"] {
        assert!(snapshot.join(file).is_file(), "{file} not in the cache");
    }

    // The same caption from the cache alone, with the Hub unreachable.
    let offline = blip(&hf_home, &[("HF_HUB_OFFLINE", "1")], REPO);
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));
    assert_eq!(online.stdout, offline.stdout);
    let record: serde_json::Value = serde_json::from_slice(&online.stdout).unwrap();
    assert_eq!(record["tokens"][0], 30522);

    let unknown = blip(&hf_home, &[("HF_ENDPOINT", &endpoint)], "tiny/no-such-model");
    assert_eq!(unknown.status.code(), Some(1));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("tiny/no-such-model") && err.contains("no such model"), "{err}");
    let _ = std::fs::remove_dir_all(&hf_home);
}
