//! The tokenizer: tokenizer.json and the vocab.txt fallback agree, and the captioning prompt is
//! turned into the ids transformers' generate starts from.

use std::path::{Path, PathBuf};

use blip::config::TextConfig;
use blip::processor::text::TextProcessor;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-caption-bin")
}

#[test]
fn vocab_txt_tokenizes_like_tokenizer_json() {
    let config = TextConfig::default();
    let from_json = TextProcessor::from_file(&model_dir().join("tokenizer.json"), &config).unwrap();
    let from_vocab = TextProcessor::from_file(&model_dir().join("vocab.txt"), &config).unwrap();
    for text in ["a picture of", "A Photo of Chelsea, the café's CAT!", "naïve résumé 東京 x-ray 3.5mm", ""] {
        let ids = from_json.encode(text).unwrap();
        assert_eq!(ids, from_vocab.encode(text).unwrap(), "{text}");
        assert_eq!(from_json.decode(&ids).unwrap(), from_vocab.decode(&ids).unwrap(), "{text}");
    }
}

#[test]
fn caption_prefix_is_what_generate_starts_from() {
    let text = TextProcessor::from_file(&model_dir().join("tokenizer.json"), &TextConfig::default()).unwrap();
    // transformers: "a picture of" → [101, 1037, 3861, 1997, 102] → [30522, 1037, 3861, 1997].
    assert_eq!(text.caption_prefix(Some("a picture of")).unwrap(), vec![30522, 1037, 3861, 1997]);
    assert_eq!(text.caption_prefix(None).unwrap(), vec![30522]);
    // No padding to 128 although bert-base-uncased's tokenizer.json asks for it.
    assert_eq!(text.encode("cat").unwrap().len(), 3);
}
