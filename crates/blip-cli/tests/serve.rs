//! `blip serve`: the real binary on a free port, called over HTTP; captions equal `blip caption`'s.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use common::{blip, image, jsonl, model};
use serde_json::{json, Value};

/// A running `blip serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    /// Starts `blip serve --port 0 --model tiny-caption-bin` with `extra` flags and waits for
    /// its `listening on` line.
    fn start(extra: &[&str]) -> Server {
        let tiny = model("tiny-caption-bin");
        let mut child = Command::new(env!("CARGO_BIN_EXE_blip"))
            .args(["serve", "--port", "0", "--model", &tiny])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("BLIP_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let base = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!("blip serve exited before listening: {seen}");
            }
            if let Some(base) = line.trim().strip_prefix("listening on ") {
                break base.to_string();
            }
            seen.push_str(&line);
        };
        // Keep reading its log so that the pipe never fills.
        std::thread::spawn(move || {
            let _ = stderr.read_to_end(&mut Vec::new());
        });
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and JSON body of a response, errors included.
fn answer(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(err) => panic!("transport error: {err}"),
    };
    let status = response.status();
    (status, response.into_json().expect("JSON body"))
}

fn post_bytes(url: &str, bytes: &[u8]) -> (u16, Value) {
    answer(ureq::post(url).send_bytes(bytes))
}

fn post_json(url: &str, body: Value) -> (u16, Value) {
    answer(ureq::post(url).send_json(body))
}

fn cli_caption(flags: &[&str], path: &str) -> String {
    let tiny = model("tiny-caption-bin");
    let mut args = vec!["caption", "--format", "jsonl", "--model", &tiny];
    args.extend_from_slice(flags);
    args.push(path);
    let out = blip(&args);
    assert!(out.status.success(), "{}", common::stderr(&out));
    jsonl(&out)[0]["caption"].as_str().unwrap().to_string()
}

fn route() -> String {
    "/models/tiny-caption-bin".to_string()
}

fn assert_error(got: (u16, Value), status: u16, kind: &str) -> String {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error_type"], kind, "{}", got.1);
    got.1["error"].as_str().expect("an error message").to_string()
}

#[test]
fn health_and_info() {
    let server = Server::start(&[]);
    let (status, body) = answer(ureq::get(&server.url("/health")).call());
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, info) = answer(ureq::get(&server.url("/info")).call());
    assert_eq!(status, 200);
    assert_eq!(info["model"], "tiny-caption-bin");
    assert_eq!(info["tasks"], json!(["image-to-text"]));
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["max_body_size"], 20 << 20);
    assert_error(answer(ureq::get(&server.url("/nowhere")).call()), 404, "not_found");
}

#[test]
fn captions_equal_the_cli() {
    let server = Server::start(&[]);
    let path = image("chelsea.png");
    let bytes = std::fs::read(&path).unwrap();
    let (status, body) = post_bytes(&server.url(&route()), &bytes);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!([{ "generated_text": cli_caption(&[], &path) }]));

    // JSON with base64 and parameters, on the pipeline route.
    let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let request = json!({"inputs": encoded, "parameters": {"max_new_tokens": 5, "num_beams": 2}});
    let (status, body) = post_json(&server.url("/pipeline/image-to-text/tiny-caption-bin"), request);
    assert_eq!(status, 200, "{body}");
    let expected = cli_caption(&["--max-new-tokens", "5", "--num-beams", "2"], &path);
    assert_eq!(body, json!([{ "generated_text": expected }]));

    // generation_parameters, as newer clients send them.
    let request =
        json!({"inputs": encoded, "parameters": {"generation_parameters": {"max_new_tokens": 5, "num_beams": 2}}});
    assert_eq!(post_json(&server.url(&route()), request).1, json!([{ "generated_text": expected }]));
}

#[test]
fn bad_requests_are_json_errors() {
    let server = Server::start(&["--max-body-size", "1000"]);
    let url = server.url(&route());
    assert_error(post_json(&url, json!({"inputs": "not base64 !!"})), 400, "invalid_base64");
    assert_error(post_bytes(&url, b"{\"inputs\": "), 400, "invalid_json");
    let message = assert_error(post_bytes(&url, b"this is no image"), 400, "invalid_image");
    assert!(message.contains("image"), "{message}");
    let message = assert_error(
        post_json(&url, json!({"inputs": "aGVsbG8=", "parameters": {"top_p": 1.5}})),
        400,
        "invalid_input",
    );
    assert!(message.contains("top_p"), "{message}");
    let message = assert_error(
        post_json(&url, json!({"inputs": "aGVsbG8=", "parameters": {"max_tokens": 3}})),
        400,
        "invalid_json",
    );
    assert!(message.contains("max_tokens"), "{message}");
    let message = assert_error(post_bytes(&server.url("/models/someone/else"), b"x"), 404, "not_found");
    assert!(message.contains("someone/else"), "{message}");
    assert_error(post_bytes(&url, &[0u8; 5000]), 413, "payload_too_large");
}

#[test]
fn api_key() {
    let server = Server::start(&["--api-key", "k"]);
    let url = server.url(&route());
    let bytes = std::fs::read(image("rocket.jpg")).unwrap();
    assert_error(post_bytes(&url, &bytes), 401, "unauthorized");
    assert_error(answer(ureq::post(&url).set("Authorization", "Bearer wrong").send_bytes(&bytes)), 401, "unauthorized");
    assert_error(answer(ureq::get(&server.url("/info")).call()), 401, "unauthorized");
    let (status, body) = answer(ureq::post(&url).set("Authorization", "Bearer k").send_bytes(&bytes));
    assert_eq!(status, 200, "{body}");
    assert!(body[0]["generated_text"].is_string(), "{body}");
    assert_eq!(answer(ureq::get(&server.url("/health")).call()).0, 200);
}
