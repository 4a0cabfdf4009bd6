//! Every config.json the public checkpoints publish loads, with transformers' dimensions.

use std::path::Path;

use blip::config::{Architecture, BlipConfig};

fn load(name: &str) -> BlipConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub-configs").join(name).join("config.json");
    BlipConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn base_checkpoints() {
    for (name, arch) in [
        ("blip-image-captioning-base", Architecture::ConditionalGeneration),
        ("blip-vqa-base", Architecture::QuestionAnswering),
        ("blip-itm-base-coco", Architecture::ImageTextRetrieval),
    ] {
        let c = load(name);
        assert_eq!(c.architecture(), Some(Ok(arch)), "{name}");
        let (t, v) = (&c.text_config, &c.vision_config);
        assert_eq!(
            (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size),
            (768, 12, 12, 3072),
            "{name}"
        );
        assert_eq!((v.image_size, v.patch_size, v.layer_norm_eps), (384, 16, 1e-5), "{name}");
        // text_config has no encoder_hidden_size: it follows the vision width.
        assert_eq!((t.hidden_size, t.encoder_hidden_size, t.num_attention_heads), (768, 768, 12), "{name}");
        assert_eq!((t.vocab_size, t.max_position_embeddings, t.num_hidden_layers), (30524, 512, 12), "{name}");
        assert_eq!((t.bos_token_id, t.sep_token_id, t.pad_token_id), (30522, 102, 0), "{name}");
        assert_eq!(t.layer_norm_eps, 1e-12, "{name}");
    }
}

#[test]
fn large_captioning() {
    let c = load("blip-image-captioning-large");
    assert_eq!(c.architecture(), Some(Ok(Architecture::ConditionalGeneration)));
    let v = &c.vision_config;
    assert_eq!((v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size), (1024, 24, 16, 4096));
    assert_eq!(c.text_config.encoder_hidden_size, 1024);
    assert_eq!(c.text_config.hidden_size, 768);
}
