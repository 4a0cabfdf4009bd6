//! `blip serve`: the real binary on a free port, called over HTTP; every answer equals the
//! CLI's on the same image and options.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{blip, image, jsonl, model};
use serde_json::{json, Value};

/// A running `blip serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

const CAPTION: &str = "tiny-caption-bin";

impl Server {
    /// Starts `blip serve --port 0` on the fixture models `models` with `extra` flags and waits
    /// until it has loaded them.
    fn start(models: &[&str], extra: &[&str]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_blip"));
        command.args(["serve", "--port", "0"]);
        for name in models {
            command.args(["--model", &model(name)]);
        }
        let mut child = command
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("BLIP_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let mut base = None;
        loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!("blip serve exited before it was ready: {seen}");
            }
            if let Some(address) = line.trim().strip_prefix("listening on ") {
                base = Some(address.to_string());
            }
            if line.trim() == "ready" {
                break;
            }
            seen.push_str(&line);
        }
        // Keep reading its log so that the pipe never fills.
        std::thread::spawn(move || {
            let _ = stderr.read_to_end(&mut Vec::new());
        });
        Server { child, base: base.expect("a listening line before ready") }
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

fn ok(got: (u16, Value)) -> Value {
    assert_eq!(got.0, 200, "{}", got.1);
    got.1
}

/// The CLI's JSONL records for `args` (the model given by fixture name) on `path`.
fn cli(command: &str, model_name: &str, flags: &[&str], path: &str) -> Vec<Value> {
    let tiny = model(model_name);
    let mut args = vec![command, "--format", "jsonl", "--model", &tiny];
    args.extend_from_slice(flags);
    args.push(path);
    let out = blip(&args);
    assert!(out.status.success(), "{}", common::stderr(&out));
    jsonl(&out)
}

fn cli_caption(flags: &[&str], path: &str) -> String {
    cli("caption", CAPTION, flags, path)[0]["caption"].as_str().unwrap().to_string()
}

fn b64(path: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

fn assert_error(got: (u16, Value), status: u16, kind: &str) -> String {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error_type"], kind, "{}", got.1);
    got.1["error"].as_str().expect("an error message").to_string()
}

/// Floats as f32, as both sides printed them.
fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[test]
fn health_info_and_models() {
    let server = Server::start(&[CAPTION, "tiny-vqa", "tiny-itm", "tiny-blip"], &[]);
    let (status, body) = answer(ureq::get(&server.url("/health")).call());
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let info = ok(answer(ureq::get(&server.url("/info")).call()));
    let tasks: Vec<(String, Value)> = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().into(), m["tasks"].clone()))
        .collect();
    assert_eq!(
        tasks,
        vec![
            (CAPTION.into(), json!(["image-to-text"])),
            ("tiny-vqa".into(), json!(["visual-question-answering"])),
            (
                "tiny-itm".into(),
                json!([
                    "zero-shot-image-classification",
                    "image-feature-extraction",
                    "feature-extraction",
                    "image-text-matching"
                ])
            ),
            (
                "tiny-blip".into(),
                json!(["zero-shot-image-classification", "image-feature-extraction", "feature-extraction"])
            ),
        ]
    );
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["max_body_size"], 20 << 20);
    assert_eq!((info["max_batch_size"].clone(), info["max_queue"].clone()), (json!(16), json!(256)));
    let listed = ok(answer(ureq::get(&server.url("/v1/models")).call()));
    assert_eq!(listed["data"].as_array().unwrap().len(), 4);
    assert_eq!(listed["data"][1]["id"], "tiny-vqa");
    assert_error(answer(ureq::get(&server.url("/nowhere")).call()), 404, "not_found");
    let openapi = ok(answer(ureq::get(&server.url("/openapi.json")).call()));
    assert!(openapi["paths"]["/v1/chat/completions"].is_object(), "{openapi}");
}

#[test]
fn captions_equal_the_cli() {
    let server = Server::start(&[CAPTION], &[]);
    let path = image("chelsea.png");
    let bytes = std::fs::read(&path).unwrap();
    let body = ok(post_bytes(&server.url("/models/tiny-caption-bin"), &bytes));
    assert_eq!(body, json!([{ "generated_text": cli_caption(&[], &path) }]));

    // JSON with base64 and parameters, on the pipeline route.
    let request = json!({"inputs": b64(&path), "parameters": {"max_new_tokens": 5, "num_beams": 2}});
    let body = ok(post_json(&server.url("/pipeline/image-to-text/tiny-caption-bin"), request));
    let expected = cli_caption(&["--max-new-tokens", "5", "--num-beams", "2"], &path);
    assert_eq!(body, json!([{ "generated_text": expected }]));

    // generation_parameters, as newer clients send them, and a data URL.
    let data_url = format!("data:image/png;base64,{}", b64(&path));
    let request =
        json!({"inputs": data_url, "parameters": {"generation_parameters": {"max_new_tokens": 5, "num_beams": 2}}});
    assert_eq!(
        ok(post_json(&server.url("/models/tiny-caption-bin"), request)),
        json!([{ "generated_text": expected }])
    );
}

#[test]
fn every_task_equals_the_cli() {
    let server = Server::start(&["tiny-vqa", "tiny-itm"], &[]);
    let path = image("astronaut.png");

    // visual-question-answering, both forms; the score is the answer's probability.
    let expected = &cli("vqa", "tiny-vqa", &["--question", "what is this?"], &path)[0];
    for request in [
        json!({"inputs": {"image": b64(&path), "question": "what is this?"}}),
        json!({"inputs": b64(&path), "image": b64(&path), "question": "what is this?"}),
    ] {
        let body = ok(post_json(&server.url("/models/tiny-vqa"), request));
        assert_eq!(body[0]["answer"], expected["answer"], "{body}");
        let probability = (expected["log_prob"].as_f64().unwrap() as f32).exp();
        assert!((body[0]["score"].as_f64().unwrap() as f32 - probability).abs() <= 1e-6, "{body}");
    }
    let request = json!({"inputs": {"image": b64(&path), "question": "what is this?"}, "parameters": {"top_k": 3}});
    let body = ok(post_json(&server.url("/pipeline/visual-question-answering/tiny-vqa"), request));
    let beams = cli(
        "vqa",
        "tiny-vqa",
        &["--question", "what is this?", "--num-beams", "3", "--num-return-sequences", "3"],
        &path,
    );
    let mut answers: Vec<String> =
        beams[0]["answers"].as_array().unwrap().iter().map(|r| r["answer"].as_str().unwrap().to_string()).collect();
    let mut got: Vec<String> =
        body.as_array().unwrap().iter().map(|a| a["answer"].as_str().unwrap().to_string()).collect();
    answers.sort();
    got.sort();
    assert_eq!(got, answers);

    // zero-shot-image-classification: probabilities best first, as `blip classify`.
    let request = json!({"inputs": b64(&path), "parameters": {"candidate_labels": ["cat", "astronaut", "rocket"], "hypothesis_template": "a photo of {}"}});
    let body = ok(post_json(&server.url("/models/tiny-itm"), request));
    let expected =
        &cli("classify", "tiny-itm", &["--labels", "cat,astronaut,rocket", "--template", "a photo of {}"], &path)[0];
    let mut labels: Vec<(String, f64)> = expected["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["label"].as_str().unwrap().to_string(), l["probability"].as_f64().unwrap()))
        .collect();
    labels.sort_by(|a, b| b.1.total_cmp(&a.1));
    let got: Vec<(String, f64)> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["label"].as_str().unwrap().to_string(), l["score"].as_f64().unwrap()))
        .collect();
    assert_eq!(got, labels);

    // image-feature-extraction and feature-extraction: `blip embed`'s embeddings.
    let body =
        ok(post_bytes(&server.url("/pipeline/image-feature-extraction/tiny-itm"), &std::fs::read(&path).unwrap()));
    let tiny = model("tiny-itm");
    let out = blip(&["embed", "--format", "jsonl", "--model", &tiny, "--image", &path]);
    assert_eq!(floats(&body[0]), floats(&jsonl(&out)[0]["embedding"]));
    let body =
        ok(post_json(&server.url("/pipeline/feature-extraction/tiny-itm"), json!({"inputs": ["a cat", "a rocket"]})));
    let out = blip(&["embed", "--format", "jsonl", "--model", &tiny, "--text", "a cat", "--text", "a rocket"]);
    let expected = jsonl(&out);
    assert_eq!(body.as_array().unwrap().len(), 2);
    // Texts batch with whatever else waits, padded to the longest: the same within float noise.
    for (got, want) in floats(&body[1]).into_iter().zip(floats(&expected[1]["embedding"])) {
        assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
    }

    // image-text-matching: `blip match`'s itm and itc.
    let request = json!({"inputs": {"image": b64(&path), "text": ["an astronaut", "a cat"]}});
    let body = ok(post_json(&server.url("/pipeline/image-text-matching/tiny-itm"), request));
    let expected = cli("match", "tiny-itm", &["--text", "an astronaut", "--text", "a cat"], &path);
    for (got, want) in body.as_array().unwrap().iter().zip(&expected) {
        assert_eq!((&got["text"], &got["itm"], &got["itc"]), (&want["text"], &want["itm"], &want["itc"]));
    }
}

/// The `data:` lines of a server-sent event stream.
fn events(response: ureq::Response) -> Vec<String> {
    let reader = BufReader::new(response.into_reader());
    reader.lines().map(Result::unwrap).filter_map(|line| line.strip_prefix("data: ").map(str::to_string)).collect()
}

#[test]
fn openai_chat_completions() {
    let server = Server::start(&[CAPTION, "tiny-vqa"], &[]);
    let path = image("rocket.jpg");
    let url = server.url("/v1/chat/completions");
    let image_part =
        json!({"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{}", b64(&path))}});

    // An image alone: the caption.
    let request = json!({"model": CAPTION, "messages": [{"role": "user", "content": [image_part]}], "max_tokens": 8});
    let body = ok(post_json(&url, request.clone()));
    let caption = cli_caption(&["--max-new-tokens", "8"], &path);
    assert_eq!(body["choices"][0]["message"]["content"], caption.as_str(), "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], CAPTION);
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], 1, "{body}");
    let record = &cli("caption", CAPTION, &["--max-new-tokens", "8"], &path)[0];
    let generated = record["tokens"].as_array().unwrap().len() - 1;
    assert_eq!(usage["completion_tokens"], generated);
    let finish = if record["tokens"].as_array().unwrap().last() == Some(&json!(102)) { "stop" } else { "length" };
    assert_eq!(body["choices"][0]["finish_reason"], finish);

    // Streamed: the chunks add up to the same text, then [DONE].
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = ureq::post(&url).send_json(streamed).unwrap();
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let data = events(response);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, caption);
    assert!(
        chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty())).count()
            > 1,
        "{chunks:?}"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], generated);

    // An image and text: a captioning model continues the prompt; a VQA model answers.
    let with_text = |model: &str, text: &str| json!({"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": text}, image_part.clone()]}]});
    let body = ok(post_json(&url, with_text(CAPTION, "a picture of")));
    assert_eq!(body["choices"][0]["message"]["content"], cli_caption(&["--prompt", "a picture of"], &path).as_str());
    let body = ok(post_json(&url, with_text("tiny-vqa", "what is it?")));
    let expected = &cli("vqa", "tiny-vqa", &["--question", "what is it?"], &path)[0];
    assert_eq!(body["choices"][0]["message"]["content"], expected["answer"]);

    // Sampling with a seed and n: the CLI's samples.
    let mut sampled = request.clone();
    sampled["n"] = json!(2);
    sampled["temperature"] = json!(0.7);
    sampled["seed"] = json!(5);
    let body = ok(post_json(&url, sampled));
    let expected = cli(
        "caption",
        CAPTION,
        &["--max-new-tokens", "8", "--do-sample", "--temperature", "0.7", "--seed", "5", "--num-return-sequences", "2"],
        &path,
    );
    for i in 0..2 {
        assert_eq!(body["choices"][i]["message"]["content"], expected[0]["captions"][i]["caption"], "{body}");
    }

    // Refusals name OpenAI's parameters.
    let mut bad = request.clone();
    bad["n"] = json!(2);
    let message = assert_error(post_json(&url, bad), 400, "invalid_input");
    assert!(message.contains("n "), "{message}");
    let mut bad = request;
    bad["frequency_penalty"] = json!(0.5);
    let message = assert_error(post_json(&url, bad), 422, "invalid_request");
    assert!(message.contains("frequency_penalty"), "{message}");
    let no_image = json!({"model": CAPTION, "messages": [{"role": "user", "content": "hello"}]});
    assert_error(post_json(&url, no_image), 422, "invalid_request");
    assert_error(post_bytes(&url, b"{\"model\": "), 400, "invalid_json");
    let unknown = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [image_part]}]});
    assert_error(post_json(&url, unknown), 404, "not_found");
}

#[test]
fn bad_requests_are_json_errors() {
    let server = Server::start(&[CAPTION, "tiny-itm"], &["--max-body-size", "1000"]);
    let url = server.url("/models/tiny-caption-bin");
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
        422,
        "invalid_request",
    );
    assert!(message.contains("max_tokens"), "{message}");
    assert_error(post_bytes(&server.url("/models/tiny-itm"), b"\x89PNG..."), 415, "unsupported_media_type");
    let message = assert_error(post_bytes(&server.url("/models/someone/else"), b"x"), 404, "not_found");
    assert!(message.contains("someone/else"), "{message}");
    let message =
        assert_error(post_bytes(&server.url("/pipeline/visual-question-answering/tiny-itm"), b"x"), 404, "not_found");
    assert!(message.contains("zero-shot-image-classification"), "{message}");
    assert_error(post_bytes(&server.url("/pipeline/translation/tiny-itm"), b"x"), 404, "not_found");
    assert_error(post_bytes(&url, &[0u8; 5000]), 413, "payload_too_large");
    let message = assert_error(
        post_json(
            &server.url("/models/tiny-itm"),
            json!({"inputs": "aGVsbG8=", "parameters": {"candidate_labels": ["a", "a"]}}),
        ),
        400,
        "invalid_input",
    );
    assert!(message.contains("a"), "{message}");
    let message = assert_error(post_json(&url, json!({"inputs": "https://example.com/cat.jpg"})), 400, "invalid_image");
    assert!(message.contains("--allow-image-urls"), "{message}");
}

#[test]
fn api_key() {
    let server = Server::start(&[CAPTION], &["--api-key", "k"]);
    let url = server.url("/models/tiny-caption-bin");
    let bytes = std::fs::read(image("rocket.jpg")).unwrap();
    assert_error(post_bytes(&url, &bytes), 401, "unauthorized");
    assert_error(answer(ureq::post(&url).set("Authorization", "Bearer wrong").send_bytes(&bytes)), 401, "unauthorized");
    assert_error(answer(ureq::get(&server.url("/info")).call()), 401, "unauthorized");
    assert_error(answer(ureq::get(&server.url("/metrics")).call()), 401, "unauthorized");
    let body = ok(answer(ureq::post(&url).set("Authorization", "Bearer k").send_bytes(&bytes)));
    assert!(body[0]["generated_text"].is_string(), "{body}");
    assert_eq!(answer(ureq::get(&server.url("/health")).call()).0, 200);
}

/// A request that keeps the tiny model's worker busy for a while: 16 beams to the full length.
fn slow_request(path: &str) -> Value {
    json!({"inputs": b64(path), "parameters": {"num_beams": 16, "max_new_tokens": 63, "min_new_tokens": 63}})
}

#[test]
fn concurrent_requests_batch_and_equal_the_cli() {
    let server = Server::start(&[CAPTION], &["--max-batch-size", "8"]);
    let url = server.url("/models/tiny-caption-bin");
    let paths: Vec<String> = common::images();
    // Keep the worker busy so that the next requests wait and run as one batch.
    let busy = {
        let (url, path) = (url.clone(), paths[0].clone());
        std::thread::spawn(move || ok(post_json(&url, slow_request(&path))))
    };
    std::thread::sleep(Duration::from_millis(100));
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (url, path) = (url.clone(), paths[i % paths.len()].clone());
            std::thread::spawn(move || ok(post_json(&url, json!({"inputs": b64(&path)}))))
        })
        .collect();
    let answers: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    busy.join().unwrap();
    for (i, body) in answers.iter().enumerate() {
        assert_eq!(body[0]["generated_text"], cli_caption(&[], &paths[i % paths.len()]).as_str());
    }
    let metrics = answer_text(ureq::get(&server.url("/metrics")).call());
    let batched = metrics
        .lines()
        .find(|l| l.starts_with("blip_batch_size_bucket") && l.contains("le=\"1.0\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap();
    assert!(batched < 7, "every request ran alone: {metrics}");
    assert!(metrics.contains("blip_requests_total{route=\"/models/{*model_id}\",status=\"200\"} 7"), "{metrics}");
}

/// Continuous batching: a request that arrives while a long generation decodes joins it at the
/// next step, and is answered when its own caption ends, long before the other's.
#[test]
fn a_request_joins_the_running_generation_and_ends_first() {
    let server = Server::start(&[CAPTION], &[]);
    let url = server.url("/models/tiny-caption-bin");
    let path = image("chelsea.png");
    // 64 sampled sequences to the full length
    let parameters =
        json!({"do_sample": true, "num_return_sequences": 64, "min_new_tokens": 63, "max_new_tokens": 63, "seed": 1});
    let long = json!({"inputs": b64(&path), "parameters": parameters});
    let start = std::time::Instant::now();
    let alone = ok(post_json(&url, long.clone()));
    let whole = start.elapsed();

    let started = std::time::Instant::now();
    let running = {
        let url = url.clone();
        std::thread::spawn(move || (ok(post_json(&url, long)), started.elapsed()))
    };
    std::thread::sleep(whole / 4);
    let short_path = image("rocket.jpg");
    let short = ok(post_json(&url, json!({"inputs": b64(&short_path)})));
    let short_done = started.elapsed();
    let (joined, long_done) = running.join().unwrap();
    assert!(short_done < long_done, "the short request waited for the long one: {short_done:?} vs {long_done:?}");
    assert_eq!(short[0]["generated_text"], cli_caption(&[], &short_path).as_str());
    assert_eq!(joined, alone, "the long generation changed when another joined it");
}

fn answer_text(result: Result<ureq::Response, ureq::Error>) -> String {
    result.expect("200").into_string().unwrap()
}

#[test]
fn overload_gets_429_then_recovers() {
    let server = Server::start(&[CAPTION], &["--max-queue", "1", "--max-batch-size", "1"]);
    let url = server.url("/models/tiny-caption-bin");
    let path = image("chelsea.png");
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (url, path) = (url.clone(), path.clone());
            std::thread::spawn(move || {
                let response = ureq::post(&url).send_json(slow_request(&path));
                match response {
                    Ok(r) => (r.status(), None),
                    Err(ureq::Error::Status(status, r)) => (status, r.header("retry-after").map(str::to_string)),
                    Err(err) => panic!("transport error: {err}"),
                }
            })
        })
        .collect();
    let statuses: Vec<(u16, Option<String>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let refused = statuses.iter().filter(|(s, _)| *s == 429).count();
    assert!(statuses.iter().all(|(s, _)| *s == 200 || *s == 429), "{statuses:?}");
    assert!(refused >= 6, "{statuses:?}");
    assert!(statuses.iter().filter(|(s, _)| *s == 429).all(|(_, retry)| retry.as_deref() == Some("1")));
    // Answered, the queue is free again.
    ok(post_bytes(&url, &std::fs::read(&path).unwrap()));
}

/// Starts `request` on a thread and gives the worker time to take it.
fn in_background(url: &str, request: Value) -> std::thread::JoinHandle<u16> {
    let url = url.to_string();
    let handle = std::thread::spawn(move || answer(ureq::post(&url).send_json(request)).0);
    std::thread::sleep(Duration::from_millis(50));
    handle
}

/// The value of a metric line that starts with `prefix`.
fn metric(server: &Server, prefix: &str) -> Option<f64> {
    let metrics = answer_text(ureq::get(&server.url("/metrics")).call());
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[test]
fn a_request_waiting_past_the_timeout_gets_504() {
    let server = Server::start(&[CAPTION], &["--max-batch-size", "1", "--request-timeout", "200ms"]);
    let url = server.url("/models/tiny-caption-bin");
    let path = image("chelsea.png");
    let busy = in_background(&url, slow_request(&path));
    assert_error(post_json(&url, slow_request(&path)), 504, "timeout");
    let _ = busy.join();
}

#[test]
fn a_client_that_hangs_up_has_its_job_cancelled() {
    let server = Server::start(&[CAPTION], &["--max-batch-size", "1"]);
    let url = server.url("/models/tiny-caption-bin");
    let path = image("chelsea.png");
    let busy = in_background(&url, slow_request(&path));
    // A request sent by hand, the connection closed while it waits behind the busy one.
    let body = json!({"inputs": b64(&path)}).to_string();
    hang_up(&server, "/models/tiny-caption-bin", &body, Duration::from_millis(20));
    assert_eq!(busy.join().unwrap(), 200);
    let cancelled = (0..50)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            metric(&server, "blip_cancelled_jobs_total{")
        })
        .expect("a cancelled job");
    assert_eq!(cancelled, 1.0);
    assert_eq!(metric(&server, "blip_images_total{"), Some(1.0), "only the busy request ran");
}

/// Sends `body` to `path` on a raw connection and hangs up after `wait`, without reading.
fn hang_up(server: &Server, path: &str, body: &str, wait: Duration) {
    let address = server.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    write!(
        socket,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(wait);
    drop(socket);
}

#[test]
fn a_client_that_hangs_up_has_its_generation_stopped() {
    let server = Server::start(&[CAPTION], &[]);
    let path = image("chelsea.png");
    // 64 sampled sequences to the full length: long enough to hang up in the middle.
    let parameters =
        json!({"do_sample": true, "num_return_sequences": 64, "min_new_tokens": 63, "max_new_tokens": 63, "seed": 1});
    let body = json!({"inputs": b64(&path), "parameters": parameters}).to_string();
    let start = std::time::Instant::now();
    ok(post_json(&server.url("/models/tiny-caption-bin"), serde_json::from_str(&body).unwrap()));
    let whole = start.elapsed();
    let full_tokens = metric(&server, "blip_generated_tokens_total{").unwrap();
    assert_eq!(full_tokens, 64.0 * 64.0);
    hang_up(&server, "/models/tiny-caption-bin", &body, whole / 3);
    let cancelled = (0..100)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            metric(&server, "blip_cancelled_jobs_total{")
        })
        .expect("a cancelled job");
    assert_eq!(cancelled, 1.0);
    // Stopped before its end: fewer tokens than a whole second run.
    std::thread::sleep(Duration::from_millis(100));
    let tokens = metric(&server, "blip_generated_tokens_total{").unwrap() - full_tokens;
    assert!(tokens < full_tokens, "{tokens} tokens after the hang-up, {full_tokens} in a whole run ({whole:?})");
}

#[cfg(unix)]
#[test]
fn graceful_shutdown_finishes_what_runs() {
    let mut server = Server::start(&[CAPTION], &[]);
    let url = server.url("/models/tiny-caption-bin");
    let path = image("chelsea.png");
    let in_flight = std::thread::spawn(move || answer(ureq::post(&url).send_json(slow_request(&path))));
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: kill(2) on the child's pid with SIGTERM; no memory is involved.
    assert_eq!(unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) }, 0);
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Serves `bytes` once per connection at any path, on a free local port: an image host.
fn image_host(bytes: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = stream.write_all(header.as_bytes());
            let _ = stream.write_all(&bytes);
        }
    });
    format!("http://{address}/image.png")
}

#[test]
fn image_urls_only_when_allowed() {
    let path = image("chelsea.png");
    let url = image_host(std::fs::read(&path).unwrap());
    let server = Server::start(&[CAPTION], &["--allow-image-urls"]);
    let body = ok(post_json(&server.url("/models/tiny-caption-bin"), json!({"inputs": url})));
    assert_eq!(body, json!([{ "generated_text": cli_caption(&[], &path) }]));
    // Larger than the body limit: refused, not read to its end.
    let small = Server::start(&[CAPTION], &["--allow-image-urls", "--max-body-size", "10KB"]);
    let message =
        assert_error(post_json(&small.url("/models/tiny-caption-bin"), json!({"inputs": url})), 400, "invalid_image");
    assert!(message.contains("limit"), "{message}");
}

#[test]
fn a_model_that_cannot_load_stops_the_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(["serve", "--port", "0", "--model", "nobody/no-such-model"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", common::tempdir("empty-cache"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = common::stderr(&out);
    assert!(stderr.contains("listening on"), "{stderr}");
    assert!(stderr.contains("nobody/no-such-model"), "{stderr}");
}
