//! `blip match --gradcam DIR`: a heatmap PNG per image-text pair (and per token with
//! --gradcam-tokens), the size of the image; checkpoints without an ITM head and layers the
//! encoder lacks are refused. (The maps themselves: crates/blip/tests/gradcam_parity.rs.)

mod common;

use common::{blip, image, model};

#[test]
fn heatmaps_are_written_per_pair_and_token() {
    let dir = std::env::temp_dir().join(format!("blip-cli-gradcam-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.display().to_string();
    let itm = model("tiny-itm");
    let (cat, rocket) = (image("chelsea.png"), image("rocket.jpg"));
    let args = [
        "match",
        "--model",
        &itm,
        "--text",
        "a cat",
        "--text",
        "a rocket",
        "--gradcam",
        &out,
        "--gradcam-layer",
        "0",
        "--gradcam-tokens",
        &cat,
        &rocket,
    ];
    let output = blip(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        4,
        "the scores are printed as without --gradcam"
    );
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "1-chelsea-text0-0-a.png",
            "1-chelsea-text0-1-cat.png",
            "1-chelsea-text0.png",
            "1-chelsea-text1-0-a.png",
            "1-chelsea-text1-1-rocket.png",
            "1-chelsea-text1.png",
            "2-rocket-text0-0-a.png",
            "2-rocket-text0-1-cat.png",
            "2-rocket-text0.png",
            "2-rocket-text1-0-a.png",
            "2-rocket-text1-1-rocket.png",
            "2-rocket-text1.png",
        ]
    );
    let original = image::open(&cat).unwrap();
    let drawn = image::open(dir.join("1-chelsea-text0.png")).unwrap();
    assert_eq!((drawn.width(), drawn.height()), (original.width(), original.height()));
    assert_ne!(drawn.to_rgb8(), original.to_rgb8(), "a heatmap is drawn");
    std::fs::remove_dir_all(&dir).unwrap();

    let output = blip(&["match", "--model", &itm, "--text", "a cat", "--gradcam", &out, &cat]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--gradcam-layer 6"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = blip(&["match", "--model", &model("tiny-blip"), "--text", "a cat", "--gradcam", &out, &cat]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("ITM head"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
