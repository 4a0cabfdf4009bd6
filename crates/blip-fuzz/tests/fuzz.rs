//! Fuzz targets for what the server reads from untrusted clients: the Inference API and
//! OpenAI request bodies (JSON, base64 and data URLs, raw bytes), the options they carry, and
//! image decoding. Under `cargo test` each runs on its corpus and a short burst of random
//! inputs; `cargo bolero test <target> --engine libfuzzer --sanitizer NONE` fuzzes one for real
//! (docs/FUZZING.md).

use std::path::Path;

use blip_server::{hf, images, openai};

/// Every parser on the same bytes: none may panic; what parses, its options applied over
/// transformers' defaults and checked, may not panic either.
#[test]
fn request_bodies() {
    bolero::check!().for_each(|body: &[u8]| {
        let defaults = blip::GenerationOptions::default();
        if let Ok(request) = hf::image_to_text(body) {
            let _ = request.generation.apply(&defaults).validate();
        }
        if let Ok(request) = hf::question_answering(body) {
            let _ = request.generation.apply(&defaults).validate();
        }
        let _ = hf::zero_shot(body).map(|r| {
            let labels: Vec<&str> = r.candidate_labels.iter().map(String::as_str).collect();
            let template = r.hypothesis_template.unwrap_or_else(|| blip::ClassifyOptions::DEFAULT_TEMPLATE.into());
            blip::ClassifyOptions::new(template, None).validate(&labels).map(drop)
        });
        let _ = hf::image_features(body);
        let _ = hf::text_features(body);
        let _ = hf::matching(body);
        if let Ok(chat) = openai::parse(body) {
            let _ = chat.overrides.apply(&defaults).validate();
        }
    });
}

/// Images named in JSON: base64, data URLs, URLs.
#[test]
fn image_sources() {
    bolero::check!().for_each(|text: &[u8]| {
        if let Ok(text) = std::str::from_utf8(text) {
            let _ = images::ImageSource::parse(text, "inputs");
        }
    });
}

/// Every format the server accepts (JPEG through libjpeg-turbo, PNG, GIF, BMP, TIFF, WebP):
/// an error or an image, never a panic, and never more than the pixel limit allows.
#[test]
fn image_decoding() {
    bolero::check!().for_each(|bytes: &[u8]| {
        if let Ok(image) = blip::load_image_from_memory(bytes, Path::new("fuzz")) {
            assert!(image.width() > 0 && image.height() > 0);
        }
    });
}
