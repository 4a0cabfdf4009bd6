//! `blip index` and `blip search` on the real binary and a real SQLite file: rows and errors,
//! search equal to `blip match`, rerank equal to ITM, incremental runs, a killed indexer, and
//! files that are not indexes.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use rusqlite::Connection;
use serde_json::Value;

/// The fixture images and two broken files in a folder.
fn collection(name: &str) -> PathBuf {
    let dir = tempdir(name);
    std::fs::create_dir_all(dir.join("photos")).unwrap();
    for name in IMAGES {
        std::fs::copy(image(name), dir.join("photos").join(name)).unwrap();
    }
    std::fs::write(dir.join("photos/broken.jpg"), "this is text").unwrap();
    std::fs::write(dir.join("photos/truncated.png"), b"\x89PNG\r\n\x1a\n\0\0").unwrap();
    dir
}

fn index(db: &Path, args: &[&str]) -> Output {
    let mut all = vec!["index", "--db", db.to_str().unwrap()];
    all.extend(args);
    blip(&all)
}

fn rows(db: &Path) -> Vec<(String, Option<usize>, Option<String>)> {
    let conn = Connection::open(db).unwrap();
    let mut select = conn.prepare("SELECT path, length(embedding), error FROM images ORDER BY path").unwrap();
    select
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.map(|n| n as usize), r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Every row's path, hash and embedding, by path.
fn contents(db: &Path) -> Vec<(String, Option<String>, Vec<f32>)> {
    let conn = Connection::open(db).unwrap();
    let mut select = conn.prepare("SELECT path, hash, embedding FROM images ORDER BY path").unwrap();
    select
        .query_map([], |r| {
            let bytes: Option<Vec<u8>> = r.get(2)?;
            let embedding =
                bytes.unwrap_or_default().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            Ok((r.get(0)?, r.get(1)?, embedding))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Largest difference between two embeddings (made in batches of other sizes: float noise).
fn furthest(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn name(path: &str) -> &str {
    Path::new(path).file_name().unwrap().to_str().unwrap()
}

#[test]
fn a_folder_is_indexed_with_errors_recorded_and_searched_as_blip_match_scores() {
    let dir = collection("search");
    let db = dir.join("index.db");
    let itm = model("tiny-itm");
    let photos = dir.join("photos");
    let out = index(&db, &["--model", &itm, photos.to_str().unwrap(), "--batch-size", "2"]);
    assert_eq!(out.status.code(), Some(1), "two files fail: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("broken.jpg: not a recognized image file"), "{err}");
    assert!(err.contains("3 indexed, 0 unchanged, 2 failed; 5 images in the index"), "{err}");

    let rows = rows(&db);
    let summary: Vec<(&str, Option<usize>, bool)> =
        rows.iter().map(|(p, len, e)| (name(p), *len, e.is_some())).collect();
    assert_eq!(
        summary,
        [
            ("astronaut.png", Some(256 * 4), false),
            ("broken.jpg", None, true),
            ("chelsea.png", Some(256 * 4), false),
            ("rocket.jpg", Some(256 * 4), false),
            ("truncated.png", None, true),
        ]
    );

    let query = "a rocket on a launch pad";
    let matched = jsonl(&blip_on(&["match", "--model", &itm, "--text", query, "--format", "jsonl"], &images()));
    let mut by_itc: Vec<(&str, f64)> =
        matched.iter().map(|r| (name(r["image"].as_str().unwrap()), r["itc"].as_f64().unwrap())).collect();
    by_itc.sort_by(|a, b| b.1.total_cmp(&a.1));
    let found = jsonl(&blip(&["search", "--db", db.to_str().unwrap(), query, "--format", "jsonl"]));
    assert_eq!(found.len(), 3);
    for (hit, (want, itc)) in found.iter().zip(&by_itc) {
        assert_eq!(name(hit["image"].as_str().unwrap()), *want);
        assert!((hit["itc"].as_f64().unwrap() - itc).abs() < 1e-6, "{hit} vs {itc}");
    }

    let mut by_itm: Vec<(&str, f64)> =
        matched.iter().map(|r| (name(r["image"].as_str().unwrap()), r["itm"].as_f64().unwrap())).collect();
    by_itm.sort_by(|a, b| b.1.total_cmp(&a.1));
    let reranked =
        jsonl(&blip(&["search", "--db", db.to_str().unwrap(), query, "--rerank", "--top", "2", "--format", "jsonl"]));
    assert_eq!(reranked.len(), 2);
    for (hit, (want, itm)) in reranked.iter().zip(&by_itm) {
        assert_eq!(name(hit["image"].as_str().unwrap()), *want);
        let got = hit["itm"].as_f64().unwrap();
        assert!((got - itm).abs() < 1e-6, "the ITM probability of blip match: {got} vs {itm}");
    }

    // An image query finds itself first.
    let similar = jsonl(&blip(&[
        "search",
        "--db",
        db.to_str().unwrap(),
        "--image",
        &image("chelsea.png"),
        "--top",
        "1",
        "--format",
        "jsonl",
    ]));
    assert_eq!(name(similar[0]["image"].as_str().unwrap()), "chelsea.png");
    assert!((similar[0]["itc"].as_f64().unwrap() - 1.0).abs() < 1e-5);
}

#[test]
fn reruns_skip_unchanged_files_reembed_changed_ones_and_prune_vanished_ones() {
    let dir = collection("incremental");
    let db = dir.join("index.db");
    let (itm, photos) = (model("tiny-itm"), dir.join("photos"));
    index(&db, &["--model", &itm, photos.to_str().unwrap()]);
    let before = rows(&db);

    // Same content, new modification time: not re-embedded. New content: re-embedded.
    std::fs::write(photos.join("astronaut.png"), std::fs::read(image("astronaut.png")).unwrap()).unwrap();
    std::fs::copy(image("rocket.jpg"), photos.join("chelsea.png")).unwrap();
    std::fs::remove_file(photos.join("broken.jpg")).unwrap();
    let out = index(&db, &["--model", &itm, photos.to_str().unwrap(), "--prune"]);
    let err = stderr(&out);
    assert!(err.contains("1 indexed, 3 unchanged, 0 failed, 1 pruned; 4 images in the index"), "{err}");
    let after = rows(&db);
    assert_eq!(after.len(), 4);
    let conn = Connection::open(&db).unwrap();
    let embedding = |file: &str| -> Vec<f32> {
        let bytes: Vec<u8> = conn
            .query_row("SELECT embedding FROM images WHERE path LIKE ?1", [format!("%/{file}")], |r| r.get(0))
            .unwrap();
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    // Embedded in batches of other sizes: equal within float noise.
    let (changed, rocket) = (embedding("chelsea.png"), embedding("rocket.jpg"));
    let furthest = changed.iter().zip(&rocket).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(furthest < 1e-6, "chelsea.png now holds the rocket: {furthest}");
    assert_eq!(before.iter().filter(|r| name(&r.0) == "broken.jpg").count(), 1);
    assert_eq!(after.iter().filter(|r| name(&r.0) == "broken.jpg").count(), 0, "pruned");

    // The same folder named another way is the same files: nothing new.
    let aliased = dir.join("photos/../photos");
    let out = index(&db, &["--model", &itm, aliased.to_str().unwrap()]);
    assert!(stderr(&out).contains("0 indexed, 4 unchanged, 0 failed; 4 images in the index"), "{}", stderr(&out));
}

#[test]
fn an_indexer_killed_mid_batch_loses_only_that_batch_and_the_next_run_completes_it() {
    let dir = collection("killed");
    let photos = dir.join("photos");
    for i in 0..6 {
        std::fs::copy(image("rocket.jpg"), photos.join(format!("copy{i}.jpg"))).unwrap();
    }
    let (itm, db) = (model("tiny-itm"), dir.join("index.db"));
    let args = ["index", "--db", db.to_str().unwrap(), "--model", &itm, photos.to_str().unwrap(), "--batch-size", "2"];
    // Aborts (as kill -9 would) with its third batch written but not committed.
    let killed = std::process::Command::new(env!("CARGO_BIN_EXE_blip"))
        .args(args)
        .env("BLIP_INDEX_TEST_ABORT_AT_COMMIT", "3")
        .output()
        .unwrap();
    assert!(!killed.status.success() && killed.status.code().is_none(), "killed by a signal");
    let partial = rows(&db);
    // astronaut, broken.jpg (failed) and chelsea, then copy0 and copy1; copy2 and copy3 lost.
    assert_eq!(partial.len(), 5, "two batches committed, the third lost");

    let out = blip(&args);
    let summary = "5 indexed, 5 unchanged, 1 failed; 11 images in the index (2 recorded with an error)";
    assert!(stderr(&out).contains(summary), "{}", stderr(&out));
    let complete = rows(&db);
    let fresh_db = dir.join("fresh.db");
    index(&fresh_db, &["--model", &itm, photos.to_str().unwrap()]);
    assert_eq!(complete, rows(&fresh_db), "the same rows as one uninterrupted run, no duplicates");
    for (resumed, fresh) in contents(&db).iter().zip(contents(&fresh_db)) {
        assert_eq!((&resumed.0, &resumed.1), (&fresh.0, &fresh.1));
        assert!(furthest(&resumed.2, &fresh.2) < 1e-6, "{}", resumed.0);
    }
}

#[test]
fn another_model_is_refused_and_foreign_files_are_clear_errors() {
    let dir = collection("refusals");
    let db = dir.join("index.db");
    let photos = dir.join("photos");
    index(&db, &["--model", &model("tiny-itm"), photos.to_str().unwrap()]);
    let out = index(&db, &["--model", &model("tiny-blip"), photos.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("refusing to mix in embeddings of") && err.contains("tiny-blip"), "{err}");
    let out = index(&db, &["--model", &model("tiny-itm"), "--dtype", "bf16", photos.to_str().unwrap()]);
    assert!(stderr(&out).contains("refusing to mix"), "{}", stderr(&out));

    let garbage = dir.join("garbage.db");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let foreign = dir.join("foreign.db");
    Connection::open(&foreign).unwrap().execute_batch("CREATE TABLE songs (title TEXT)").unwrap();
    for (file, says) in [(&garbage, "not an SQLite database"), (&foreign, "an SQLite database of another program")] {
        for args in [
            vec!["index", "--db", file.to_str().unwrap(), "--model", &model("tiny-itm"), photos.to_str().unwrap()],
            vec!["search", "--db", file.to_str().unwrap(), "a cat"],
        ] {
            let out = blip(&args);
            assert_eq!(out.status.code(), Some(1));
            let err = stderr(&out);
            assert!(err.contains("not a blip index") && err.contains(says), "{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    let out = blip(&["search", "--db", dir.join("missing.db").to_str().unwrap(), "a cat"]);
    assert!(stderr(&out).contains("no such index; make one with `blip index"), "{}", stderr(&out));
    let out = blip(&["search", "--db", db.to_str().unwrap(), "--rerank", "a cat"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A real index damaged in the middle: a clear error, never a panic.
    let damaged = dir.join("damaged.db");
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 8192, "the index spans several pages");
    bytes[4096..8192].fill(0xA5);
    std::fs::write(&damaged, bytes).unwrap();
    let out = blip(&["search", "--db", damaged.to_str().unwrap(), "a cat"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("damaged.db"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn captions_are_stored_as_blip_caption_writes_them() {
    let dir = collection("captions");
    let db = dir.join("index.db");
    let captioner = model("tiny-caption-bin");
    let out = index(
        &db,
        &[
            "--model",
            &model("tiny-itm"),
            "--caption",
            "--caption-model",
            &captioner,
            "--num-beams",
            "2",
            &image("rocket.jpg"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: Value = jsonl(&blip(&[
        "caption",
        "--model",
        &captioner,
        "--num-beams",
        "2",
        "--format",
        "jsonl",
        &image("rocket.jpg"),
    ]))
    .remove(0);
    let conn = Connection::open(&db).unwrap();
    let (caption, score): (String, f64) =
        conn.query_row("SELECT caption, caption_score FROM images", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!(caption, expected["caption"].as_str().unwrap());
    assert!((score - expected["score"].as_f64().unwrap()).abs() < 1e-6);
    let found = jsonl(&blip(&["search", "--db", db.to_str().unwrap(), "rocket", "--format", "jsonl"]));
    assert_eq!(found[0]["caption"], expected["caption"]);

    let out = blip(&["index", "--db", db.to_str().unwrap(), "--num-beams", "2", &image("rocket.jpg")]);
    assert_eq!(out.status.code(), Some(2), "generation options need --caption");

    // --caption on images indexed without captions captions them; another captioner is refused.
    let later = dir.join("later.db");
    let itm = model("tiny-itm");
    index(&later, &["--model", &itm, &image("rocket.jpg"), &image("chelsea.png")]);
    let out = index(&later, &["--model", &itm, "--caption", "--caption-model", &captioner, &image("rocket.jpg")]);
    assert!(stderr(&out).contains("1 indexed, 0 unchanged"), "{}", stderr(&out));
    let conn = Connection::open(&later).unwrap();
    let captioned: i64 =
        conn.query_row("SELECT count(*) FROM images WHERE caption IS NOT NULL", [], |r| r.get(0)).unwrap();
    assert_eq!(captioned, 1);
    let other = model("tiny-caption-st");
    let out = index(&later, &["--model", &itm, "--caption", "--caption-model", &other, &image("rocket.jpg")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("captions of"), "{}", stderr(&out));
}
