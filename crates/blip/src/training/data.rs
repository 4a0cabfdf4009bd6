//! Fine-tuning data: JSONL files of `{"image", "text"}` (captioning) or `{"image", "question",
//! "answer"}` (VQA), image paths relative to the file, read and checked line by line; and the
//! order the examples are taken in, a seeded shuffle per epoch.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a fine-tuning run trains the model to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainTask {
    /// `{"image", "text"}`: the caption of the image.
    Caption,
    /// `{"image", "question", "answer"}`: the answer to the question about the image.
    Vqa,
}

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    /// The caption, or the question (VQA).
    pub text: String,
    /// The answer (VQA only).
    pub answer: Option<String>,
    /// Its line in the file (1-based), for messages.
    pub line: usize,
}

/// A data file's usable examples and the lines left out.
#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// (line, why) of each line skipped (with `skip_bad`).
    pub skipped: Vec<(usize, String)>,
}

impl Dataset {
    /// FNV-1a over every example's image path, texts and line, in order, as hex: the same for
    /// the same data, whatever the machine.
    pub fn fingerprint(&self) -> String {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes.iter().chain(&[0xff]) {
                hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for example in &self.examples {
            feed(example.image.to_string_lossy().as_bytes());
            feed(example.text.as_bytes());
            feed(example.answer.as_deref().unwrap_or_default().as_bytes());
            feed(&example.line.to_le_bytes());
        }
        format!("{hash:016x}")
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    image: String,
    text: Option<String>,
    question: Option<String>,
    answer: Option<String>,
}

impl Dataset {
    /// Reads `path`. A line that cannot be used (malformed JSON, a field missing or empty, an
    /// image that does not exist) is an error naming its line, or, with `skip_bad`, is skipped
    /// and recorded. Blank lines are ignored.
    pub fn read(path: &Path, task: TrainTask, skip_bad: bool) -> Result<Self> {
        let content = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut examples = Vec::new();
        let mut skipped = Vec::new();
        for (index, raw) in content.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            match parse(raw, line, base, task) {
                Ok(example) => examples.push(example),
                Err(reason) if skip_bad => skipped.push((line, reason)),
                Err(reason) => {
                    return Err(Error::file(
                        format!("{}:{line}", path.display()),
                        format!("{reason} (--skip-bad skips such lines)"),
                    ))
                }
            }
        }
        if examples.is_empty() {
            return Err(Error::file(path, "no usable examples"));
        }
        Ok(Self { path: path.to_path_buf(), examples, skipped })
    }
}

fn parse(raw: &str, line: usize, base: &Path, task: TrainTask) -> std::result::Result<Example, String> {
    let parsed: Line =
        serde_json::from_str(raw).map_err(|e| format!("not a JSON object of the expected fields: {e}"))?;
    let field = |value: Option<String>, name: &str| match value {
        Some(text) if !text.trim().is_empty() => Ok(text),
        Some(_) => Err(format!("empty \"{name}\"")),
        None => Err(format!("no \"{name}\"")),
    };
    let (text, answer) = match task {
        TrainTask::Caption => (field(parsed.text, "text")?, None),
        TrainTask::Vqa => (field(parsed.question, "question")?, Some(field(parsed.answer, "answer")?)),
    };
    let image = base.join(&parsed.image);
    if !image.is_file() {
        return Err(format!("image {} does not exist", image.display()));
    }
    Ok(Example { image, text, answer, line })
}

/// The order of `n` examples in `epoch`: a Fisher–Yates shuffle driven by SplitMix64 seeded
/// with `seed + epoch`, so that a run (and its resumption) takes them in the same order, and the
/// PyTorch reference in scripts/make_training_fixtures.py can take them so too.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut state = seed.wrapping_add(epoch);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_permutation_that_changes_by_epoch() {
        let first = epoch_order(10, 7, 0);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(first, epoch_order(10, 7, 0));
        assert_ne!(first, epoch_order(10, 7, 1));
    }

    #[test]
    fn bad_lines_name_their_line_or_are_skipped() {
        let dir = std::env::temp_dir().join(format!("blip-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.png"), b"").unwrap();
        let file = dir.join("train.jsonl");
        let lines = [
            r#"{"image": "a.png", "text": "a cat"}"#,
            r#"{"image": "missing.png", "text": "a dog"}"#,
            r#"{"image": "a.png", "text": "  "}"#,
            r#"{"image": "a.png""#,
            "",
            r#"{"image": "a.png", "text": "a sofa"}"#,
        ];
        std::fs::write(&file, lines.join("\n")).unwrap();
        let error = Dataset::read(&file, TrainTask::Caption, false).unwrap_err().to_string();
        assert!(error.contains("train.jsonl:2") && error.contains("missing.png"), "{error}");
        let data = Dataset::read(&file, TrainTask::Caption, true).unwrap();
        assert_eq!(data.examples.iter().map(|e| e.line).collect::<Vec<_>>(), [1, 6]);
        assert_eq!(data.skipped.iter().map(|s| s.0).collect::<Vec<_>>(), [2, 3, 4]);
        assert!(data.skipped[1].1.contains("empty \"text\""));
        let vqa = Dataset::read(&file, TrainTask::Vqa, true).unwrap_err().to_string();
        assert!(vqa.contains("no usable examples"), "{vqa}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
