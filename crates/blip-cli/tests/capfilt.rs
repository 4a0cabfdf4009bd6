//! `blip capfilt` on the tiny checkpoints: the texts kept are those `blip match`'s ITM keeps,
//! seeded runs repeat, and an interrupted run continues to the same file.

mod common;

use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Pairs for the three fixture images (one named twice), a line that is not a pair, and a
/// missing image.
fn pairs(name: &str) -> PathBuf {
    let dir = tempdir(name);
    std::fs::create_dir_all(dir.join("img")).unwrap();
    for name in IMAGES {
        std::fs::copy(image(name), dir.join("img").join(name)).unwrap();
    }
    let lines = [
        r#"{"image": "img/chelsea.png", "text": "a cat on a sofa"}"#,
        r#"{"image": "img/rocket.jpg", "text": "a rocket launch"}"#,
        r#"{"image": "img/chelsea.png", "text": "buy cheap shoes online"}"#,
        r#"{"image": "img/astronaut.png", "text": "an astronaut"}"#,
    ];
    std::fs::write(dir.join("pairs.jsonl"), lines.join("\n") + "\n").unwrap();
    dir
}

fn capfilt(dir: &Path, extra: &[&str]) -> std::process::Output {
    let input = dir.join("pairs.jsonl");
    let (captioner, filter) = (model("tiny-caption-bin"), model("tiny-itm"));
    let mut args = vec![
        "capfilt",
        "--input",
        input.to_str().unwrap(),
        "--caption-model",
        &captioner,
        "--filter-model",
        &filter,
        "--seed",
        "7",
    ];
    args.extend(extra);
    blip(&args)
}

#[test]
fn kept_texts_are_those_blip_match_scores_at_or_above_the_threshold() {
    let dir = pairs("filter");
    let all = capfilt(&dir, &["--threshold", "0"]);
    assert!(all.status.success(), "{}", stderr(&all));
    let all = jsonl(&all);
    assert_eq!(
        all.iter().map(|r| r["image"].as_str().unwrap()).collect::<Vec<_>>(),
        ["img/chelsea.png", "img/rocket.jpg", "img/astronaut.png"]
    );
    let chelsea: Vec<(&str, &str)> = all[0]["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["text"].as_str().unwrap(), t["source"].as_str().unwrap()))
        .collect();
    assert_eq!(&chelsea[..2], [("a cat on a sofa", "web"), ("buy cheap shoes online", "web")]);
    assert_eq!(chelsea.len(), 5, "two web texts and three synthetic captions");
    assert!(chelsea[2..].iter().all(|(text, source)| *source == "synthetic" && !text.starts_with("a picture of")));

    // Every ITM probability as `blip match` gives it for the same image and texts.
    for record in &all {
        let texts = record["texts"].as_array().unwrap();
        let mut args =
            vec!["match".to_string(), "--model".into(), model("tiny-itm"), "--format".into(), "jsonl".into()];
        for t in texts {
            args.extend(["--text".to_string(), t["text"].as_str().unwrap().to_string()]);
        }
        args.push(dir.join(record["image"].as_str().unwrap()).display().to_string());
        let matched = jsonl(&blip(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_eq!(matched.len(), texts.len());
        for (t, m) in texts.iter().zip(&matched) {
            let (ours, theirs) = (t["itm"].as_f64().unwrap(), m["itm"].as_f64().unwrap());
            assert!((ours - theirs).abs() < 1e-6, "{}: {ours} vs {theirs}", t["text"]);
        }
    }

    let threshold = 0.6;
    let kept = jsonl(&capfilt(&dir, &["--threshold", "0.6"]));
    assert_eq!(kept.len(), all.len());
    let count = |records: &[Value]| records.iter().map(|r| r["texts"].as_array().unwrap().len()).sum::<usize>();
    assert!(0 < count(&kept) && count(&kept) < count(&all), "the threshold keeps some texts and drops others");
    for (kept, all) in kept.iter().zip(&all) {
        let expected: Vec<&Value> =
            all["texts"].as_array().unwrap().iter().filter(|t| t["itm"].as_f64().unwrap() >= threshold).collect();
        let got: Vec<&Value> = kept["texts"].as_array().unwrap().iter().collect();
        assert_eq!(got, expected);
    }
}

#[test]
fn the_same_seed_gives_the_same_output_and_a_rerun_continues_an_interrupted_one() {
    let dir = pairs("resume");
    let first = capfilt(&dir, &[]);
    let second = capfilt(&dir, &["--batch-size", "1"]);
    // The same texts whatever the batches; the ITM probabilities within float noise, since
    // products over other numbers of rows sum in another order (bit-equal on some CPUs' BLAS,
    // not on others').
    let (first_records, second_records) = (jsonl(&first), jsonl(&second));
    assert_eq!(first_records.len(), second_records.len());
    for (a, b) in first_records.iter().zip(&second_records) {
        assert_eq!(a["image"], b["image"]);
        let (a, b) = (a["texts"].as_array().unwrap(), b["texts"].as_array().unwrap());
        assert_eq!(a.len(), b.len(), "seeded sampling, whatever the batches");
        for (a, b) in a.iter().zip(b) {
            assert_eq!((&a["text"], &a["source"]), (&b["text"], &b["source"]), "seeded sampling, whatever the batches");
            let (a, b) = (a["itm"].as_f64().unwrap(), b["itm"].as_f64().unwrap());
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
    assert!(stderr(&first).contains("4 pairs in (0 bad lines)"), "{}", stderr(&first));

    // A run stopped after one record and in the middle of the next.
    let output = dir.join("clean.jsonl");
    let whole = stdout(&first);
    let cut = whole.find('\n').unwrap() + 20;
    std::fs::write(&output, &whole[..cut]).unwrap();
    let rerun = capfilt(&dir, &["--output", output.to_str().unwrap()]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(stderr(&rerun).contains("1 images already done; continuing"), "{}", stderr(&rerun));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), whole);
    let again = capfilt(&dir, &["--output", output.to_str().unwrap()]);
    assert!(stderr(&again).contains("3 images already done"), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), whole, "nothing appended twice");
}

#[test]
fn bad_lines_missing_images_and_wrong_options_are_reported() {
    let dir = pairs("bad");
    let mut text = std::fs::read_to_string(dir.join("pairs.jsonl")).unwrap();
    text.push_str("not json\n{\"image\": \"img/missing.png\", \"text\": \"x\"}\n");
    text.push_str("{\"image\": \"img/rocket.jpg\", \"text\": \" \"}\n");
    // Tokenizes to nothing: refused by the model, which fails this image alone.
    text.push_str("{\"image\": \"img/astronaut.png\", \"text\": \"\\u200b\"}\n");
    std::fs::write(dir.join("pairs.jsonl"), text).unwrap();
    let out = capfilt(&dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("pairs.jsonl:5: not a pair"), "{err}");
    assert!(err.contains("missing.png: cannot read image file"), "{err}");
    assert!(err.contains("pairs.jsonl:7: the text of img/rocket.jpg is empty"), "{err}");
    assert!(err.contains("img/astronaut.png: "), "{err}");
    assert!(err.contains("6 pairs in (2 bad lines)") && err.contains("images failed: 2"), "{err}");
    assert_eq!(jsonl(&out).len(), 2, "the good images still filtered");

    let out = capfilt(&dir, &["--output", input_path(&dir).as_str()]);
    assert!(stderr(&out).contains("is the --input file"), "{}", stderr(&out));
    let out = capfilt(&dir, &["--threshold", "1.5"]);
    assert!(stderr(&out).contains("--threshold must be a probability from 0 to 1, not 1.5"), "{}", stderr(&out));
    let input = dir.join("pairs.jsonl");
    let captioner = model("tiny-caption-bin");
    let out = blip(&[
        "capfilt",
        "--input",
        input.to_str().unwrap(),
        "--caption-model",
        &captioner,
        "--filter-model",
        &model("tiny-blip"),
    ]);
    assert!(stderr(&out).contains("--filter-model") && stderr(&out).contains("no ITM head"), "{}", stderr(&out));
}

fn input_path(dir: &Path) -> String {
    dir.join("pairs.jsonl").display().to_string()
}
