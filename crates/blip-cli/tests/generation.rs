//! The generation options of `blip caption` and `blip vqa` (beam search, sampling, penalties,
//! several captions per image) run as the real binary on the committed tiny checkpoints: bad
//! combinations refused before any model is loaded, outputs shaped as documented and, for beam
//! search, the tokens and scores transformers' `generate` gave
//! (`crates/blip/tests/fixtures/expected/generation.json`).

mod common;

use common::*;

use std::process::Output;

use serde_json::Value;

const QUESTION: &str = "what is in the picture?";

/// `blip caption` on the tiny captioning checkpoint with `args`, then `images`.
fn caption(args: &[&str], images: &[&str]) -> Output {
    let model = model("tiny-caption-bin");
    let paths: Vec<String> = images.iter().map(|i| image(i)).collect();
    let mut all = vec!["caption", "--model", &model];
    all.extend(args);
    all.extend(paths.iter().map(String::as_str));
    blip(&all)
}

/// `blip vqa` on the tiny VQA checkpoint asking [`QUESTION`] with `args`, then `images`.
fn vqa(args: &[&str], images: &[&str]) -> Output {
    let model = model("tiny-vqa");
    let paths: Vec<String> = images.iter().map(|i| image(i)).collect();
    let mut all = vec!["vqa", "--model", &model, "--question", QUESTION];
    all.extend(args);
    all.extend(paths.iter().map(String::as_str));
    blip(&all)
}

/// The records of a successful JSONL run (shadows the shared `jsonl`, which accepts failed runs).
fn jsonl(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", stderr(out));
    stdout(out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn expected() -> Value {
    let path = fixtures().join("expected/generation.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The caption case `name` run on image `i` alone.
fn caption_case(expected: &Value, name: &str, i: usize) -> Value {
    expected["caption_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name && c["images"] == serde_json::json!([i]))
        .unwrap_or_else(|| panic!("no caption case {name} for image {i}"))
        .clone()
}

/// An expected sequence without the padding transformers adds after the final [SEP] 102 to give a
/// batch's rows one length.
fn unpadded(sequence: &Value) -> Value {
    let tokens = sequence.as_array().unwrap();
    let end = tokens.iter().skip(1).position(|t| t == 102).map_or(tokens.len(), |p| p + 2);
    Value::Array(tokens[..end].to_vec())
}

fn f32_of(value: &Value) -> f32 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}")) as f32
}

fn assert_close(actual: f32, expected: f32, what: &str) {
    assert!((actual - expected).abs() <= 1e-4 * expected.abs().max(1.0), "{what}: {actual} vs {expected}");
}

/// Every bad combination is refused with one line naming the flag, before the model is loaded:
/// the model folder does not even exist.
#[test]
fn bad_generation_options_are_refused_before_loading() {
    let chelsea = image("chelsea.png");
    let cases: [(&[&str], &[&str]); 11] = [
        (&["--top-p", "1.5"], &["--top-p", "1.5"]),
        (&["--top-p", "0"], &["--top-p"]),
        (&["--temperature", "0"], &["--temperature"]),
        (&["--temperature", "-1"], &["--temperature"]),
        (&["--num-captions", "4", "--num-beams", "2"], &["--num-captions 4", "--num-beams 2"]),
        (&["--num-return-sequences", "4", "--num-beams", "2"], &["--num-captions 4", "--num-beams 2"]),
        (&["--do-sample", "--num-beams", "3"], &["--do-sample", "--num-beams 3"]),
        (&["--min-new-tokens", "9", "--max-new-tokens", "3"], &["--min-new-tokens 9", "--max-new-tokens 3"]),
        (&["--max-new-tokens", "0"], &["--max-new-tokens"]),
        (&["--num-beams", "0"], &["--num-beams"]),
        (&["--repetition-penalty", "0"], &["--repetition-penalty"]),
    ];
    for (args, named) in cases {
        let out = blip(&[&["caption", "--model", "./no/such/model"], args, &[chelsea.as_str()]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        for flag in named {
            assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
        }
        assert!(!err.contains("no/such/model") && !err.contains('_'), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn bad_vqa_generation_options_are_refused_before_loading() {
    let chelsea = image("chelsea.png");
    let cases: [(&[&str], &str); 3] = [
        (&["--num-return-sequences", "3", "--num-beams", "2"], "--num-return-sequences 3"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--do-sample", "--num-beams", "2"], "--do-sample"),
    ];
    for (args, named) in cases {
        let out = blip(&[&["vqa", "--model", "./no/such/model", "-q", QUESTION], args, &[chelsea.as_str()]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(named) && !err.contains("no/such/model"), "{args:?}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

/// Options that contradict the checkpoint's generation defaults (its generation_config.json,
/// transformers' defaults without one) are refused once those are read, before the weights.
#[test]
fn options_against_the_checkpoints_defaults_are_refused() {
    let out = caption(&["--num-captions", "2"], &["chelsea.png"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("--num-captions 2") && err.contains("--num-beams"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = vqa(&["--num-return-sequences", "2"], &["chelsea.png"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--num-return-sequences 2"), "{}", stderr(&out));
}

/// Ranking a closed answer list generates nothing: clap refuses every generation flag with it.
#[test]
fn vqa_generation_options_conflict_with_an_answer_list() {
    let chelsea = image("chelsea.png");
    let answers = fixtures().join("no-such-answers.txt").display().to_string();
    for args in [
        &["--num-beams", "3"][..],
        &["--do-sample"],
        &["--top-k", "5"],
        &["--num-return-sequences", "2"],
        &["--seed", "1"],
        &["--early-stopping", "true"],
    ] {
        let out = blip(
            &[&["vqa", "--model", "./no/such/model", "-q", QUESTION, "--answers", &answers], args, &[chelsea.as_str()]]
                .concat(),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("--answers") && err.contains(args[0]), "{args:?}: {err}");
    }
}

#[test]
fn early_stopping_takes_false_true_or_never() {
    let out = blip(&["caption", "--model", "./no/such/model", "--early-stopping", "maybe", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--early-stopping") && err.contains("never"), "{err}");
}

/// Greedy captions (the default) carry the mean log-probability as score and the sum as log_prob.
#[test]
fn greedy_records_carry_score_and_log_prob() {
    let records = jsonl(&caption(&["--format", "jsonl"], &IMAGES));
    assert_eq!(records.len(), 3);
    for record in &records {
        assert!(record["caption"].is_string() && record.get("captions").is_none(), "{record}");
        let new_tokens = record["tokens"].as_array().unwrap().len() - 1;
        let (score, log_prob) = (f32_of(&record["score"]), f32_of(&record["log_prob"]));
        assert!(log_prob < 0.0, "{record}");
        assert_close(score, log_prob / new_tokens as f32, "mean log-probability");
    }
}

#[test]
fn beam_search_gives_several_captions_best_first() {
    let expected = expected();
    let records = jsonl(&caption(&["--num-beams", "3", "--num-captions", "3", "--format", "jsonl"], &IMAGES));
    assert_eq!(records.len(), 3);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["image"], image(IMAGES[i]).as_str());
        assert!(record.get("caption").is_none(), "{record}");
        let captions = record["captions"].as_array().unwrap();
        assert_eq!(captions.len(), 3, "{record}");
        let scores: Vec<f32> = captions.iter().map(|c| f32_of(&c["score"])).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "image {i}: scores {scores:?} not best first");
        for caption in captions {
            assert!(caption["caption"].is_string() && caption["tokens"].is_array(), "{caption}");
            assert!(f32_of(&caption["log_prob"]) < 0.0, "{caption}");
        }
        // The best beam is the one transformers returns alone.
        let case = caption_case(&expected, "beam3", i);
        assert_eq!(captions[0]["tokens"], case["sequences"][0], "image {i}");
        assert_close(scores[0], f32_of(&case["sequences_scores"][0]), "beam score");
    }

    // Text: one line per caption, best first, in the JSONL's order.
    let text = stdout(&caption(&["--num-beams", "3", "--num-captions", "3"], &IMAGES));
    let lines: Vec<(&str, &str)> = text.lines().map(|l| l.split_once('\t').unwrap()).collect();
    assert_eq!(lines.len(), 9, "{text}");
    for (i, record) in records.iter().enumerate() {
        for (j, caption) in record["captions"].as_array().unwrap().iter().enumerate() {
            assert_eq!(lines[3 * i + j], (image(IMAGES[i]).as_str(), caption["caption"].as_str().unwrap()));
        }
    }
}

/// BLIP's COCO evaluation settings: the prompt, 3 beams, 5 to 20 new tokens.
#[test]
fn beam_search_with_a_prompt_gives_transformers_tokens_and_score() {
    let expected = expected();
    let case = caption_case(&expected, "beam3_prompt", 0);
    assert_eq!(case["prompt"], "a picture of");
    let records = jsonl(&caption(&["--prompt", "a picture of", "--num-beams", "3", "--format", "jsonl"], &IMAGES[..1]));
    assert_eq!(records[0]["tokens"], case["sequences"][0]);
    assert_close(f32_of(&records[0]["score"]), f32_of(&case["sequences_scores"][0]), "beam score");
    assert!(records[0]["caption"].as_str().unwrap().starts_with("a picture of"), "{}", records[0]);

    let coco = caption_case(&expected, "beam3_min5_max20_prompt", 0);
    let args = ["--prompt", "a picture of", "--num-beams", "3", "--min-new-tokens", "5", "--max-new-tokens", "20"];
    let records = jsonl(&caption(&[&args[..], &["--format", "jsonl"]].concat(), &IMAGES[..1]));
    assert_eq!(records[0]["tokens"], coco["sequences"][0]);
}

#[test]
fn several_beams_with_a_prompt_match_transformers() {
    let expected = expected();
    let args = ["--prompt", "a picture of", "--num-beams", "5", "--num-captions", "3", "--format", "jsonl"];
    let records = jsonl(&caption(&args, &IMAGES));
    for (i, record) in records.iter().enumerate() {
        let case = caption_case(&expected, "beam5_return3_prompt", i);
        let captions = record["captions"].as_array().unwrap();
        for (j, caption) in captions.iter().enumerate() {
            assert_eq!(caption["tokens"], unpadded(&case["sequences"][j]), "image {i}, caption {j}");
            assert_close(f32_of(&caption["score"]), f32_of(&case["sequences_scores"][j]), "beam score");
        }
    }
}

#[test]
fn seeded_sampling_repeats() {
    let args = ["--do-sample", "--seed", "7", "--num-captions", "2", "--top-p", "0.9", "--format", "jsonl"];
    let first = caption(&args, &IMAGES);
    let second = caption(&args, &IMAGES);
    let records = jsonl(&first);
    assert_eq!(stdout(&first), stdout(&second));
    assert!(records.iter().all(|r| r["captions"].as_array().unwrap().len() == 2), "{records:?}");

    // Another seed samples something else (for at least one image).
    let other =
        caption(&["--do-sample", "--seed", "8", "--num-captions", "2", "--top-p", "0.9", "--format", "jsonl"], &IMAGES);
    assert_ne!(stdout(&first), stdout(&other));

    // Text output repeats too.
    let text = ["--do-sample", "--seed", "7"];
    assert_eq!(stdout(&caption(&text, &IMAGES)), stdout(&caption(&text, &IMAGES)));
}

/// Sampling from the single most likely token is greedy search.
#[test]
fn sampling_the_top_token_is_greedy() {
    let greedy = caption(&[], &IMAGES);
    let top1 = caption(&["--do-sample", "--top-k", "1"], &IMAGES);
    assert!(greedy.status.success() && top1.status.success(), "{}", stderr(&top1));
    assert_eq!(stdout(&greedy), stdout(&top1));
    assert_eq!(
        jsonl(&caption(&["--format", "jsonl"], &IMAGES)),
        jsonl(&caption(&["--do-sample", "--top-k", "1", "--seed", "3", "--format", "jsonl"], &IMAGES))
    );
}

#[test]
fn sampling_only_flags_without_sampling_are_a_warning() {
    let out = caption(&["--temperature", "0.5"], &IMAGES[..1]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), stdout(&caption(&[], &IMAGES[..1])));
    assert!(stderr(&out).contains("warning: --temperature has no effect without --do-sample"), "{}", stderr(&out));
}

#[test]
fn vqa_beam_search_has_score_and_log_prob() {
    let expected = expected();
    let case = expected["vqa_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "beam3" && c["image"] == 0 && c["question"] == QUESTION)
        .unwrap()
        .clone();
    let records = jsonl(&vqa(&["--num-beams", "3", "--format", "jsonl"], &IMAGES));
    assert_eq!(records.len(), 3);
    for record in &records {
        assert_eq!(record["question"], QUESTION);
        assert!(record["answer"].is_string() && record["tokens"].is_array(), "{record}");
        assert!(f32_of(&record["score"]) < 0.0 && f32_of(&record["log_prob"]) < 0.0, "{record}");
    }
    assert_eq!(records[0]["tokens"], case["sequences"][0]);
    assert_close(f32_of(&records[0]["score"]), f32_of(&case["sequences_scores"][0]), "beam score");
}

#[test]
fn vqa_several_answers_best_first() {
    let expected = expected();
    let records = jsonl(&vqa(&["--num-beams", "5", "--num-return-sequences", "2", "--format", "jsonl"], &IMAGES));
    for (i, record) in records.iter().enumerate() {
        let case = expected["vqa_cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "beam5_return2" && c["image"] == i && c["question"] == QUESTION)
            .unwrap();
        assert!(record.get("answer").is_none(), "{record}");
        let answers = record["answers"].as_array().unwrap();
        assert_eq!(answers.len(), 2, "{record}");
        for (j, answer) in answers.iter().enumerate() {
            assert!(answer["answer"].is_string() && answer["log_prob"].is_number(), "{answer}");
            assert_eq!(answer["tokens"], unpadded(&case["sequences"][j]), "image {i}, answer {j}");
            assert_close(f32_of(&answer["score"]), f32_of(&case["sequences_scores"][j]), "beam score");
        }
    }
    let text = stdout(&vqa(&["--num-beams", "5", "--num-return-sequences", "2"], &IMAGES));
    assert_eq!(text.lines().count(), 6, "{text}");
}
