//! `blip vqa`, `blip match`, `blip embed` and `blip classify` run as the real binary on the
//! committed tiny checkpoints, compared with what transformers computed on them
//! (`crates/blip/tests/fixtures/expected`), and every bad input giving a clear error.

mod common;

use common::*;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn expected(checkpoint: &str) -> Value {
    let path = fixtures().join("expected").join(format!("{checkpoint}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An f32 tensor of a safetensors file: shape and row-major values.
fn read_tensor(file: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (view.shape().to_vec(), values)
}

/// A tensor transformers computed for `checkpoint`, as rows.
fn expected_rows(checkpoint: &str, name: &str) -> Vec<Vec<f32>> {
    let (shape, values) = read_tensor(&fixtures().join("expected").join(format!("{checkpoint}.safetensors")), name);
    assert_eq!(shape.len(), 2, "{name}");
    values.chunks(shape[1]).map(<[f32]>::to_vec).collect()
}

fn as_f32s(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tolerance, "{what}[{i}]: {a} vs transformers' {e} (off by {})", (a - e).abs());
    }
}

fn missing_image(name: &str) -> String {
    tempdir(name).join("missing.png").display().to_string()
}

const QUESTION: &str = "how many animals are there?";

/// The tiny-vqa case of image `i` and [`QUESTION`].
fn vqa_case(expected: &Value, i: usize) -> &Value {
    assert_eq!(expected["images"][i], format!("images-model/{}", IMAGES[i]).as_str());
    expected["cases"].as_array().unwrap().iter().find(|c| c["image"] == i && c["question"] == QUESTION).unwrap()
}

#[test]
fn vqa_generates_transformers_tokens_in_one_batch() {
    let out = blip_on(&["vqa", "--model", &model("tiny-vqa"), "--question", QUESTION, "--format", "jsonl"], &images());
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    let expected = expected("tiny-vqa");
    assert_eq!(records.len(), 3);
    for (i, record) in records.iter().enumerate() {
        let case = vqa_case(&expected, i);
        assert_eq!(record["image"], image(IMAGES[i]).as_str());
        assert_eq!(record["question"], QUESTION);
        assert_eq!(record["tokens"], case["generate_max_new_10"], "image {i}");
        assert_eq!(record["answer"], case["answer_max_new_10"], "image {i}");
    }
}

#[test]
fn vqa_text_prints_path_and_answer() {
    let out = blip(&["vqa", "--model", &model("tiny-vqa"), "-q", QUESTION, &image("astronaut.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = expected("tiny-vqa");
    let case = vqa_case(&expected, 1);
    assert_eq!(stdout(&out), format!("{}\t{}\n", image("astronaut.png"), case["answer_max_new_10"].as_str().unwrap()));
}

/// The answer list of tiny-vqa.json in a file.
fn answers_file(name: &str) -> (PathBuf, Vec<String>) {
    let answers: Vec<String> =
        expected("tiny-vqa")["answers"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let file = tempdir(name).join("answers.txt");
    // Padding and blank lines are ignored.
    let text: String = answers.iter().map(|a| format!("  {a} \n\n")).collect();
    std::fs::write(&file, text).unwrap();
    (file, answers)
}

/// The `top` best answers of a case by transformers' log-likelihoods, best first.
fn best_answers(case: &Value, answers: &[String], top: usize) -> Vec<(String, f32)> {
    let mut scored: Vec<(String, f32)> = answers.iter().cloned().zip(as_f32s(&case["log_likelihoods"])).collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.truncate(top);
    scored
}

#[test]
fn vqa_ranks_the_answer_list_by_transformers_log_likelihoods() {
    let (file, answers) = answers_file("rank");
    let file = file.display().to_string();
    let args = ["vqa", "--model", &model("tiny-vqa"), "-q", QUESTION, "--answers", &file, "--top", "3"];
    let out = blip_on(&[&args[..], &["--candidates", "12", "--format", "jsonl"]].concat(), &images());
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    let expected = expected("tiny-vqa");
    assert_eq!(records.len(), 3);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["image"], image(IMAGES[i]).as_str());
        assert_eq!(record["question"], QUESTION);
        let best = best_answers(vqa_case(&expected, i), &answers, 3);
        let got = record["answers"].as_array().unwrap();
        assert_eq!(got.len(), 3, "{record}");
        for (rank, ((answer, score), got)) in best.iter().zip(got).enumerate() {
            assert_eq!(got["answer"], answer.as_str(), "image {i}, rank {rank}");
            let got_score = got["score"].as_f64().unwrap() as f32;
            assert!((got_score - score).abs() <= 1e-4, "image {i}, {answer}: {got_score} vs transformers' {score}");
        }
    }

    // Text: one `path<TAB>answer<TAB>score` line per ranked answer; the best only by default.
    let out = blip(&["vqa", "--model", &model("tiny-vqa"), "-q", QUESTION, "--answers", &file, &image("rocket.jpg")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (answer, score) = best_answers(vqa_case(&expected, 2), &answers, 1).remove(0);
    let text = stdout(&out);
    let columns: Vec<&str> = text.trim_end().split('\t').collect();
    assert_eq!(columns[..2], [image("rocket.jpg").as_str(), answer.as_str()], "{text}");
    assert!((columns[2].parse::<f32>().unwrap() - score).abs() <= 1e-4, "{text}");
}

#[test]
fn vqa_missing_image_is_reported_in_place_and_the_rest_answered() {
    let missing = missing_image("vqa-missing");
    let inputs = [image("chelsea.png"), missing.clone(), image("rocket.jpg")];
    let out = blip_on(&["vqa", "--model", &model("tiny-vqa"), "-q", QUESTION, "--format", "jsonl"], &inputs);
    assert_eq!(out.status.code(), Some(1));
    let records = jsonl(&out);
    let expected = expected("tiny-vqa");
    assert_eq!(records.len(), 3, "one line per image");
    assert_eq!(records[0]["tokens"], vqa_case(&expected, 0)["generate_max_new_10"]);
    assert_eq!(records[1]["image"], missing.as_str());
    assert!(records[1]["error"].as_str().unwrap().contains("missing.png"), "{}", records[1]);
    assert_eq!(records[2]["tokens"], vqa_case(&expected, 2)["generate_max_new_10"]);
    let err = stderr(&out);
    assert!(err.contains("missing.png") && err.contains("1 of 3 images could not be answered"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Refused before the model is loaded: the model folder does not even exist.
#[test]
fn vqa_bad_options_are_refused_before_loading() {
    let chelsea = image("chelsea.png");
    let dir = tempdir("vqa-options");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n   \n").unwrap();
    let (empty, gone) = (empty.display().to_string(), dir.join("gone.txt").display().to_string());
    let cases: [(&[&str], &str); 7] = [
        (&["-q", QUESTION, "--top", "2"], "--answers"),
        (&["-q", QUESTION, "--candidates", "2"], "--answers"),
        (&["-q", QUESTION, "--answers", &empty, "--top", "0"], "--top"),
        (&["-q", QUESTION, "--min-new-tokens", "5", "--max-new-tokens", "3"], "--min-new-tokens"),
        (&["-q", "  "], "--question"),
        (&["-q", QUESTION, "--answers", &empty], "empty.txt"),
        (&["-q", QUESTION, "--answers", &gone], "gone.txt"),
    ];
    for (args, named) in cases {
        let out = blip(&[&["vqa", "--model", "./no/such/model"], args, &[chelsea.as_str()]].concat());
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(named) && !err.contains("no/such/model"), "{args:?}: {err}");
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn vqa_overlong_answers_are_refused_after_loading() {
    let out =
        blip(&["vqa", "--model", &model("tiny-vqa"), "-q", QUESTION, "--max-new-tokens", "500", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("positions"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
}

fn texts(checkpoint: &str) -> Vec<String> {
    expected(checkpoint)["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

/// `--text` once per text.
fn text_args(texts: &[String]) -> Vec<&str> {
    texts.iter().flat_map(|t| ["--text", t.as_str()]).collect()
}

/// Cosines of unit-norm embeddings: [image][text].
fn cosines(images: &[Vec<f32>], texts: &[Vec<f32>]) -> Vec<Vec<f32>> {
    images.iter().map(|i| texts.iter().map(|t| i.iter().zip(t).map(|(a, b)| a * b).sum()).collect()).collect()
}

#[test]
fn match_gives_transformers_itm_and_itc_per_pair_image_major() {
    let texts = texts("tiny-itm");
    let model = model("tiny-itm");
    let args =
        [&["match", "--model", model.as_str(), "--format", "jsonl", "--batch-size", "2"], &text_args(&texts)[..]]
            .concat();
    let out = blip_on(&args, &images());
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 3 * texts.len());
    let (itm, itc) = (expected_rows("tiny-itm", "itm"), expected_rows("tiny-itm", "itc"));
    for (n, record) in records.iter().enumerate() {
        let (i, j) = (n / texts.len(), n % texts.len());
        assert_eq!(record["image"], image(IMAGES[i]).as_str());
        assert_eq!(record["text"], texts[j].as_str());
        let pair = format!("image {i}, text {j}");
        assert_close(&[record["itm"].as_f64().unwrap() as f32], &[itm[i][j]], 1e-5, &format!("itm of {pair}"));
        assert_close(&[record["itc"].as_f64().unwrap() as f32], &[itc[i][j]], 1e-5, &format!("itc of {pair}"));
    }

    // Text: `path<TAB>text<TAB>itm<TAB>itc`.
    let out = blip(&["match", "--model", &model, "--text", &texts[0], &image("chelsea.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let columns: Vec<&str> = text.trim_end().split('\t').collect();
    assert_eq!(columns[..2], [image("chelsea.png").as_str(), texts[0].as_str()]);
    assert!((columns[2].parse::<f32>().unwrap() - itm[0][0]).abs() <= 1e-4, "{text}");
    assert!((columns[3].parse::<f32>().unwrap() - itc[0][0]).abs() <= 1e-4, "{text}");
}

#[test]
fn match_on_blip_model_has_no_itm() {
    let texts = texts("tiny-blip");
    let model = model("tiny-blip");
    let out = blip_on(
        &[&["match", "--model", model.as_str(), "--format", "jsonl"], &text_args(&texts)[..]].concat(),
        &images(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 3 * texts.len());
    let itc = cosines(&expected_rows("tiny-blip", "image_embeds"), &expected_rows("tiny-blip", "text_embeds"));
    for (n, record) in records.iter().enumerate() {
        let (i, j) = (n / texts.len(), n % texts.len());
        assert!(record["itm"].is_null(), "{record}");
        assert_close(
            &[record["itc"].as_f64().unwrap() as f32],
            &[itc[i][j]],
            1e-5,
            &format!("itc of image {i}, text {j}"),
        );
    }

    let out = blip(&["match", "--model", &model, "--text", &texts[0], &image("chelsea.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).split('\t').nth(2), Some("-"), "{}", stdout(&out));
}

#[test]
fn match_refuses_empty_text_before_loading() {
    let out = blip(&["match", "--model", "./no/such/model", "--text", "a cat", "--text", " ", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("--text") && err.contains("empty") && !err.contains("no/such/model"), "{err}");
}

/// A text longer than the model's positions (64 in the tiny model) is truncated with a warning
/// on stderr, and scores as its first 62 words.
#[test]
fn match_truncates_overlong_text_with_a_warning() {
    let model = model("tiny-itm");
    let long = "cat ".repeat(100);
    let cut = "cat ".repeat(62);
    let out = blip(&["match", "--model", &model, "--format", "jsonl", "--text", &long, &image("chelsea.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("WARN") && err.contains("truncated") && err.contains("64 positions"), "{err}");
    let exact = blip(&["match", "--model", &model, "--format", "jsonl", "--text", &cut, &image("chelsea.png")]);
    assert!(stderr(&exact).is_empty(), "{}", stderr(&exact));
    let (a, b) = (&jsonl(&out)[0], &jsonl(&exact)[0]);
    assert_eq!((&a["itm"], &a["itc"]), (&b["itm"], &b["itc"]));
}

/// The safetensors metadata of an embeddings file.
fn metadata(file: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(file).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    metadata.metadata().clone().unwrap()
}

fn inputs_of(metadata: &std::collections::HashMap<String, String>) -> Vec<String> {
    serde_json::from_str(&metadata["inputs"]).unwrap()
}

#[test]
fn embed_images_writes_transformers_embeddings_with_their_inputs() {
    let file = tempdir("embed-images").join("images.safetensors");
    let model = model("tiny-itm");
    let out = blip_on(&["embed", "--model", &model, "--out", &file.display().to_string(), "--image"], &images());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let (shape, values) = read_tensor(&file, "image_embeds");
    assert_eq!(shape, [3, 256]);
    assert_close(&values, &expected_rows("tiny-itm", "image_embeds").concat(), 1e-5, "image_embeds");
    let metadata = metadata(&file);
    assert_eq!(metadata["model"], model);
    assert_eq!(metadata["kind"], "image");
    assert_eq!(inputs_of(&metadata), images());
}

#[test]
fn embed_leaves_unreadable_images_out_of_the_tensor() {
    let dir = tempdir("embed-missing");
    let file = dir.join("images.safetensors");
    let missing = dir.join("missing.png").display().to_string();
    let inputs = [image("chelsea.png"), missing.clone(), image("rocket.jpg")];
    let out = blip_on(
        &["embed", "--model", &model("tiny-itm"), "--out", &file.display().to_string(), "--format", "jsonl", "--image"],
        &inputs,
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("missing.png") && err.contains("1 of 3 images could not be embedded"), "{err}");
    let records = jsonl(&out);
    assert_eq!(records.len(), 3, "one line per image");
    assert_eq!(records[1]["image"], missing.as_str());
    assert!(records[1]["error"].as_str().unwrap().contains("missing.png"));

    let expected = expected_rows("tiny-itm", "image_embeds");
    let kept = [expected[0].clone(), expected[2].clone()];
    let (shape, values) = read_tensor(&file, "image_embeds");
    assert_eq!(shape, [2, 256]);
    assert_close(&values, &kept.concat(), 1e-5, "image_embeds");
    assert_eq!(inputs_of(&metadata(&file)), [image("chelsea.png"), image("rocket.jpg")]);
    for (record, row) in [&records[0], &records[2]].into_iter().zip(&kept) {
        assert_close(&as_f32s(&record["embedding"]), row, 1e-5, "JSONL embedding");
    }
}

#[test]
fn embed_texts_writes_transformers_embeddings_with_their_inputs() {
    let texts = texts("tiny-blip");
    let file = tempdir("embed-texts").join("texts.safetensors");
    let model = model("tiny-blip");
    let out = blip_on(&["embed", "--model", &model, "--out", &file.display().to_string(), "--text"], &texts);
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, values) = read_tensor(&file, "text_embeds");
    assert_eq!(shape, [4, 512]);
    assert_close(&values, &expected_rows("tiny-blip", "text_embeds").concat(), 1e-5, "text_embeds");
    let metadata = metadata(&file);
    assert_eq!((metadata["model"].as_str(), metadata["kind"].as_str()), (model.as_str(), "text"));
    assert_eq!(inputs_of(&metadata), texts);
}

#[test]
fn embed_jsonl_prints_one_embedding_per_input() {
    let texts = texts("tiny-itm");
    let out =
        blip_on(&["embed", "--model", &model("tiny-itm"), "--format", "jsonl", "--batch-size", "3", "--text"], &texts);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    let expected = expected_rows("tiny-itm", "text_embeds");
    assert_eq!(records.len(), texts.len());
    for ((record, text), row) in records.iter().zip(&texts).zip(&expected) {
        assert_eq!(record["text"], text.as_str());
        assert_close(&as_f32s(&record["embedding"]), row, 1e-5, text);
    }

    let out = blip(&["embed", "--model", &model("tiny-itm"), "--format", "jsonl", "--image", &image("astronaut.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["image"], image("astronaut.png").as_str());
    assert_close(&as_f32s(&records[0]["embedding"]), &expected_rows("tiny-itm", "image_embeds")[1], 1e-5, "astronaut");
}

#[test]
fn embed_wants_exactly_one_kind_of_input_and_somewhere_to_put_it() {
    let chelsea = image("chelsea.png");
    let model = model("tiny-itm");
    let out = blip(&["embed", "--model", &model, "--format", "jsonl"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--image") && stderr(&out).contains("--text"), "{}", stderr(&out));

    let out = blip(&["embed", "--model", &model, "--format", "jsonl", "--image", &chelsea, "--text", "a cat"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());

    let out = blip(&["embed", "--model", "./no/such/model", "--image", &chelsea]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("give --out FILE or --format jsonl"), "{}", stderr(&out));
}

fn labels_of(record: &Value) -> &Vec<Value> {
    record["labels"].as_array().unwrap()
}

#[test]
fn classify_probabilities_sum_to_one_best_first() {
    let model = model("tiny-itm");
    let labels = "cat, astronaut,rocket ,dog,flag";
    let out = blip_on(&["classify", "--model", &model, "--labels", labels, "--format", "jsonl"], &images());
    assert!(out.status.success(), "{}", stderr(&out));
    let records = jsonl(&out);
    assert_eq!(records.len(), 3);
    for (record, path) in records.iter().zip(images()) {
        assert_eq!(record["image"], path.as_str());
        let scores = labels_of(record);
        let mut names: Vec<&str> = scores.iter().map(|s| s["label"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["astronaut", "cat", "dog", "flag", "rocket"]);
        let probabilities: Vec<f32> = scores.iter().map(|s| s["probability"].as_f64().unwrap() as f32).collect();
        assert!((probabilities.iter().sum::<f32>() - 1.0).abs() <= 1e-5, "{probabilities:?}");
        assert!(probabilities.windows(2).all(|w| w[0] >= w[1]), "{probabilities:?}");
        assert!(scores.iter().all(|s| s["itc"].is_number() && s.get("itm").is_none()), "{record}");
    }

    // Text: `path<TAB>label (0.712), ...`, the best --top labels.
    let out = blip(&["classify", "--model", &model, "--labels", labels, "--top", "2", &image("chelsea.png")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let best: Vec<String> = labels_of(&records[0])[..2]
        .iter()
        .map(|s| format!("{} ({:.3})", s["label"].as_str().unwrap(), s["probability"].as_f64().unwrap()))
        .collect();
    assert_eq!(stdout(&out), format!("{}\t{}\n", image("chelsea.png"), best.join(", ")));
}

/// With the template `{}`, the labels are the texts themselves: BlipModel's
/// `logits_per_image.softmax(1)`.
#[test]
fn classify_gives_transformers_probabilities() {
    let texts = texts("tiny-blip");
    let out = blip_on(
        &[
            "classify",
            "--model",
            &model("tiny-blip"),
            "--labels",
            &texts.join(","),
            "--template",
            "{}",
            "--format",
            "jsonl",
        ],
        &images(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let probs = expected_rows("tiny-blip", "probs");
    for (i, record) in jsonl(&out).iter().enumerate() {
        for score in labels_of(record) {
            let j = texts.iter().position(|t| score["label"] == t.as_str()).unwrap();
            let p = score["probability"].as_f64().unwrap() as f32;
            assert_close(&[p], &[probs[i][j]], 1e-5, &format!("probability of image {i}, text {j}"));
        }
    }
}

#[test]
fn classify_rerank_puts_the_top_labels_first_by_itm() {
    let model = model("tiny-itm");
    let labels = "cat,astronaut,rocket,dog,flag";
    let plain = blip_on(&["classify", "--model", &model, "--labels", labels, "--format", "jsonl"], &images());
    let args =
        ["classify", "--model", &model, "--labels", labels, "--rerank", "--rerank-top", "3", "--format", "jsonl"];
    let reranked = blip_on(&args, &images());
    assert!(reranked.status.success(), "{}", stderr(&reranked));
    for (plain, reranked) in jsonl(&plain).iter().zip(&jsonl(&reranked)) {
        let (plain, reranked) = (labels_of(plain), labels_of(reranked));
        assert_eq!(reranked.len(), 5);
        let itm: Vec<f64> = reranked[..3].iter().map(|s| s["itm"].as_f64().unwrap()).collect();
        assert!(itm.windows(2).all(|w| w[0] >= w[1]), "{itm:?}");
        assert!(reranked[3..].iter().all(|s| s.get("itm").is_none()));
        // The three reranked are the three most probable; the rest keep their order.
        let names =
            |scores: &[Value]| scores.iter().map(|s| s["label"].as_str().unwrap().to_string()).collect::<Vec<_>>();
        let (mut top, mut plain_top) = (names(&reranked[..3]), names(&plain[..3]));
        top.sort();
        plain_top.sort();
        assert_eq!(top, plain_top);
        assert_eq!(names(&reranked[3..]), names(&plain[3..]));
    }
}

#[test]
fn classify_rerank_without_an_itm_head_is_refused() {
    let out =
        blip(&["classify", "--model", &model("tiny-blip"), "--labels", "cat,dog", "--rerank", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("--rerank") && err.contains("BlipModel") && err.contains("ITM"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn classify_bad_labels_are_refused_before_loading() {
    for (labels, named) in [("cat,,dog", "empty"), ("cat, dog,dog ", "\"dog\" twice"), (" ", "empty")] {
        let out = blip(&["classify", "--model", "./no/such/model", "--labels", labels, &image("chelsea.png")]);
        assert_eq!(out.status.code(), Some(1), "{labels}");
        let err = stderr(&out);
        assert!(err.contains("--labels") && err.contains(named) && !err.contains("no/such/model"), "{labels}: {err}");
    }
    let out =
        blip(&["classify", "--model", "./no/such/model", "--labels", "cat", "--template", "a", &image("chelsea.png")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--template"), "{}", stderr(&out));
}

/// One line naming the checkpoint's class and the command that uses it.
#[test]
fn wrong_kind_of_checkpoint_is_refused() {
    let chelsea = image("chelsea.png");
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["vqa", "--model", &model("tiny-caption-bin"), "-q", QUESTION],
            "BlipForConditionalGeneration",
            "`blip caption`",
        ),
        (&["match", "--model", &model("tiny-vqa"), "--text", "a cat"], "BlipForQuestionAnswering", "`blip vqa`"),
        (
            &["classify", "--model", &model("tiny-caption-bin"), "--labels", "cat"],
            "BlipForConditionalGeneration",
            "`blip caption`",
        ),
        (&["vqa", "--model", &model("tiny-itm"), "-q", QUESTION], "BlipForImageTextRetrieval", "`blip match`"),
    ];
    for (args, class, command) in cases {
        let out = blip(&[args, &[chelsea.as_str()]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(class) && err.contains(command), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(stdout(&out).is_empty());
    }
    let out = blip(&["embed", "--model", &model("tiny-vqa"), "--format", "jsonl", "--text", "a cat"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("BlipForQuestionAnswering"), "{}", stderr(&out));
}
