//! The index without a model: rows, searches that see other connections' commits, and the
//! checks on what is written.

use blip_index::{ImageRecord, Index, ModelIdentity};

fn identity(dim: usize) -> ModelIdentity {
    ModelIdentity {
        model: "test".into(),
        config_hash: "0".repeat(64),
        dtype: "f32".into(),
        resize: "torchvision".into(),
        embedding_dim: dim,
    }
}

fn record(path: &str, embedding: Vec<f32>) -> ImageRecord {
    ImageRecord {
        path: path.into(),
        hash: Some("h".into()),
        size: 1,
        mtime_ns: 1,
        width: Some(1),
        height: Some(1),
        embedding: Some(embedding),
        caption: None,
        caption_score: None,
        error: None,
    }
}

fn database(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("blip-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    db
}

#[test]
fn a_search_sees_what_another_connection_committed() {
    let db = database("two-handles.db");
    let mut writer = Index::open(&db).unwrap();
    writer.bind_model(&identity(2)).unwrap();
    writer.add(&[record("/a.jpg", vec![1.0, 0.0])], &[]).unwrap();
    let reader = Index::open(&db).unwrap();
    let hits = reader.search(&[0.0, 1.0], 5).unwrap();
    assert_eq!(hits.iter().map(|h| h.path.as_str()).collect::<Vec<_>>(), ["/a.jpg"]);

    writer.add(&[record("/b.jpg", vec![0.0, 1.0])], &[]).unwrap();
    let hits = reader.search(&[0.0, 1.0], 5).unwrap();
    assert_eq!(hits.iter().map(|h| (h.path.as_str(), h.itc)).collect::<Vec<_>>(), [("/b.jpg", 1.0), ("/a.jpg", 0.0)]);

    // Replacing a row keeps one row per path.
    writer.add(&[record("/a.jpg", vec![0.6, 0.8])], &[]).unwrap();
    let hits = reader.search(&[0.0, 1.0], 5).unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!((hits[1].path.as_str(), hits[1].itc), ("/a.jpg", 0.8));
}

#[test]
fn embeddings_of_another_width_and_other_models_are_refused() {
    let db = database("checks.db");
    let mut index = Index::open(&db).unwrap();
    let err = index.add(&[record("/a.jpg", vec![1.0, 0.0])], &[]).unwrap_err().to_string();
    assert!(err.contains("no model recorded"), "{err}");
    index.bind_model(&identity(2)).unwrap();
    let err = index.add(&[record("/a.jpg", vec![1.0, 0.0, 0.0])], &[]).unwrap_err().to_string();
    assert!(err.contains("/a.jpg: an embedding of 3 values where the index holds 2"), "{err}");
    let err = index.bind_model(&identity(3)).unwrap_err().to_string();
    assert!(err.contains("refusing to mix"), "{err}");
    let err = index.search(&[1.0, 0.0, 0.0], 1).unwrap_err().to_string();
    assert!(err.contains("the query embedding has 3 values"), "{err}");
    assert!(index.search(&[1.0, 0.0], 1).unwrap().is_empty());

    // Rows of files that are gone are pruned; the others stay.
    let kept = db.display().to_string();
    index.add(&[record(&kept, vec![1.0, 0.0]), record("/no/such/file.jpg", vec![0.0, 1.0])], &[]).unwrap();
    assert_eq!(index.prune().unwrap(), 1);
    assert!(index.get(&kept).unwrap().is_some());
    assert_eq!(index.len().unwrap(), 1);
}
