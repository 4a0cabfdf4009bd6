//! Images as users name them (folders, `-` lists on standard input, http(s) URLs) and the
//! sidecar caption files kohya's training scripts read, on the real binary.

mod common;

use common::*;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

/// `field` of every JSONL record, keyed by the image's file name.
fn by_name(records: &[Value], field: &str) -> Vec<(String, Value)> {
    records
        .iter()
        .map(|r| {
            let name = Path::new(r["image"].as_str().unwrap()).file_name().unwrap().to_string_lossy().to_string();
            (name, r[field].clone())
        })
        .collect()
}

/// A folder of the fixture images, one in a subfolder, with a text file and a hidden image that
/// are not taken.
fn image_folder(name: &str) -> std::path::PathBuf {
    let dir = tempdir(name);
    std::fs::create_dir_all(dir.join("b/nested")).unwrap();
    std::fs::create_dir_all(dir.join(".cache")).unwrap();
    std::fs::copy(image("rocket.jpg"), dir.join("a-rocket.jpg")).unwrap();
    std::fs::copy(image("chelsea.png"), dir.join("b/nested/chelsea")).unwrap(); // found by content
    std::fs::copy(image("astronaut.png"), dir.join("b/astronaut.png")).unwrap();
    std::fs::copy(image("astronaut.png"), dir.join(".cache/astronaut.png")).unwrap();
    std::fs::write(dir.join("b/notes.md"), "not an image").unwrap();
    dir
}

#[test]
fn a_folder_is_walked_recursively_in_sorted_order_with_the_same_captions_as_its_files() {
    let dir = image_folder("folder");
    let model = model("tiny-caption-bin");
    let out = blip(&["caption", "--model", &model, "--format", "jsonl", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let found = by_name(&jsonl(&out), "tokens");
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a-rocket.jpg", "astronaut.png", "chelsea"]);

    let files = blip_on(&["caption", "--model", &model, "--format", "jsonl"], &images());
    let expected = by_name(&jsonl(&files), "tokens");
    for (name, tokens) in &found {
        let original = if name == "a-rocket.jpg" { "rocket.jpg" } else { name.trim_end_matches(".png") };
        let want = expected.iter().find(|(n, _)| n.starts_with(original)).unwrap();
        assert_eq!(tokens, &want.1, "{name}");
    }
}

#[test]
fn dash_reads_a_list_of_images_from_standard_input() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(["caption", "--model", &model("tiny-caption-bin"), "--format", "jsonl", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let list = format!("{}\n\n{}\r\n", image("rocket.jpg"), image("chelsea.png"));
    child.stdin.take().unwrap().write_all(list.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["image"], image("rocket.jpg").as_str());
    assert_eq!(records[1]["image"], image("chelsea.png").as_str());
}

#[test]
fn an_empty_folder_is_a_clear_error() {
    let dir = tempdir("empty-folder");
    let out = blip(&["caption", "--model", &model("tiny-caption-bin"), dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no images found in"), "{}", stderr(&out));
}

/// Serves `body` once over HTTP on a free local port; returns the URL.
fn serve_once(body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).unwrap();
    });
    format!("http://127.0.0.1:{port}/rocket.jpg")
}

#[test]
fn urls_are_fetched_and_read_as_files_are() {
    let url = serve_once(std::fs::read(image("rocket.jpg")).unwrap());
    let model = model("tiny-caption-bin");
    let out = blip(&["caption", "--model", &model, "--format", "jsonl", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let file = blip(&["caption", "--model", &model, "--format", "jsonl", &image("rocket.jpg")]);
    assert_eq!(jsonl(&out)[0]["tokens"], jsonl(&file)[0]["tokens"]);
    assert_eq!(jsonl(&out)[0]["image"], url.as_str());

    // Nothing listens on the discard port: one clear line, the other images still captioned.
    let out = blip(&["caption", "--model", &model, "http://127.0.0.1:9/cat.png", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("http://127.0.0.1:9/cat.png: cannot fetch the image (no network"), "{err}");
    assert_eq!(stdout(&out).lines().count(), 1);
}

#[test]
fn caption_files_beside_the_images_skip_overwrite_or_refuse_existing_ones() {
    let dir = image_folder("sidecars");
    let model = model("tiny-caption-bin");
    let folder = dir.to_str().unwrap();
    let std_out = blip(&["caption", "--model", &model, "--format", "jsonl", folder]);
    let captions = by_name(&jsonl(&std_out), "caption");

    let out = blip(&["caption", "--model", &model, folder, "--caption-extension", ".txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("3 .txt files written, 0 skipped (already there), 0 failed"), "{}", stderr(&out));
    let sidecar = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    assert_eq!(sidecar("a-rocket.txt"), format!("{}\n", captions[0].1.as_str().unwrap()));
    assert_eq!(sidecar("b/astronaut.txt"), format!("{}\n", captions[1].1.as_str().unwrap()));
    assert_eq!(sidecar("b/nested/chelsea.txt"), format!("{}\n", captions[2].1.as_str().unwrap()));

    // A hand-edited caption is never replaced without --overwrite.
    std::fs::write(dir.join("b/astronaut.txt"), "my own caption\n").unwrap();
    std::fs::remove_file(dir.join("a-rocket.txt")).unwrap();
    let out = blip(&["caption", "--model", &model, folder, "--caption-extension", "txt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("astronaut.txt: already exists; add --overwrite"), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 .txt files written, 0 skipped (already there), 2 failed"), "{}", stderr(&out));
    assert_eq!(sidecar("b/astronaut.txt"), "my own caption\n");

    std::fs::remove_file(dir.join("a-rocket.txt")).unwrap();
    let out = blip(&["caption", "--model", &model, folder, "--caption-extension", ".txt", "--skip-existing"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 .txt files written, 2 skipped (already there), 0 failed"), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1, "skipped images are not captioned");
    assert_eq!(sidecar("b/astronaut.txt"), "my own caption\n");

    let out = blip(&["caption", "--model", &model, folder, "--caption-extension", ".txt", "--overwrite"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sidecar("b/astronaut.txt"), format!("{}\n", captions[1].1.as_str().unwrap()));
    let temporary = walk(&dir).into_iter().filter(|p| p.contains(".tmp")).count();
    assert_eq!(temporary, 0);
}

#[test]
fn vqa_and_classify_write_their_best_answer_and_label() {
    let dir = image_folder("sidecars-tasks");
    let folder = dir.to_str().unwrap();
    let out = blip(&[
        "vqa",
        "--model",
        &model("tiny-vqa"),
        "--question",
        "what is it?",
        folder,
        "--caption-extension",
        ".answer",
        "--format",
        "jsonl",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let answer = jsonl(&out)[0]["answer"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(dir.join("a-rocket.answer")).unwrap(), format!("{answer}\n"));

    let out = blip(&[
        "classify",
        "--model",
        &model("tiny-itm"),
        "--labels",
        "cat,rocket,person",
        folder,
        "--caption-extension",
        ".tags",
        "--top",
        "2",
        "--format",
        "jsonl",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let labels = &jsonl(&out)[0]["labels"];
    let best_two = format!("{}, {}\n", labels[0]["label"].as_str().unwrap(), labels[1]["label"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(dir.join("a-rocket.tags")).unwrap(), best_two);
}

#[test]
fn sidecar_flags_need_an_extension() {
    let out = blip(&["caption", "--model", &model("tiny-caption-bin"), "--skip-existing", &image("rocket.jpg")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--caption-extension"), "{}", stderr(&out));
}

fn walk(dir: &Path) -> Vec<String> {
    let mut all = vec![];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(walk(&path));
        } else {
            all.push(path.display().to_string());
        }
    }
    all
}
