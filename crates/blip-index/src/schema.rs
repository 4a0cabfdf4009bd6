//! The database's tables (documented in docs/COLLECTIONS.md), their version, and the model the
//! embeddings came from.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// Written to `meta.schema_version`; a database of another version is refused, not guessed at.
pub const SCHEMA_VERSION: i64 = 1;

/// `application_id` in the SQLite header ("BLIP"), telling our databases from others.
const APPLICATION_ID: i64 = 0x424C_4950;

const CREATE: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE images (
    id            INTEGER PRIMARY KEY,
    path          TEXT NOT NULL UNIQUE,
    hash          TEXT,
    size          INTEGER NOT NULL,
    mtime_ns      INTEGER NOT NULL,
    width         INTEGER,
    height        INTEGER,
    embedding     BLOB,
    caption       TEXT,
    caption_score REAL,
    error         TEXT,
    indexed_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

/// Which model made the embeddings: what the user named, a hash of its `config.json`, and the
/// dtype its weights were held in. Two identities are the same model only when all three agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    pub model: String,
    pub config_hash: String,
    pub dtype: String,
    /// The image resize (transformers 5's torchvision or 4's PIL): it changes the pixels.
    pub resize: String,
    pub embedding_dim: usize,
}

impl ModelIdentity {
    /// The identity of `matcher`, loaded from `model` (a Hub id or folder) with `dtype`, resizing
    /// with `resize`.
    pub fn of(
        model: &str,
        dtype: blip::DType,
        resize: blip::ResizeBackend,
        matcher: &blip::ImageTextMatcher,
    ) -> Result<Self> {
        let config_file = blip::Checkpoint::locate(model)?.config_file()?;
        let bytes = std::fs::read(&config_file).map_err(|e| Error::Query(format!("{}: {e}", config_file.display())))?;
        Ok(Self {
            model: model_key(model),
            config_hash: blake3::hash(&bytes).to_hex().to_string(),
            dtype: format!("{dtype:?}").to_lowercase(),
            resize: format!("{resize:?}").to_lowercase(),
            embedding_dim: matcher.embedding_dim(),
        })
    }

    /// The dtype recorded, as the library names it.
    pub fn dtype(&self) -> Result<blip::DType> {
        match self.dtype.as_str() {
            "f32" => Ok(blip::DType::F32),
            "bf16" => Ok(blip::DType::BF16),
            "f16" => Ok(blip::DType::F16),
            other => Err(Error::Query(format!("the index records dtype {other:?}, which this program does not know"))),
        }
    }

    /// The resize recorded, as the library names it.
    pub fn resize(&self) -> Result<blip::ResizeBackend> {
        match self.resize.as_str() {
            "torchvision" => Ok(blip::ResizeBackend::Torchvision),
            "pil" => Ok(blip::ResizeBackend::Pil),
            other => Err(Error::Query(format!("the index records resize {other:?}, which this program does not know"))),
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} (dtype {}, resize {}, config.json blake3 {})",
            self.model,
            self.dtype,
            self.resize,
            self.config_hash.get(..12).unwrap_or(&self.config_hash)
        )
    }
}

/// How a model is recorded: a Hub id as given, a local folder by its canonical path (so that
/// `blip search` finds it from anywhere, and two spellings of one folder are one model).
pub fn model_key(model: &str) -> String {
    match Path::new(model) {
        dir if dir.is_dir() => std::fs::canonicalize(dir).map_or(model.to_string(), |p| p.display().to_string()),
        _ => model.to_string(),
    }
}

/// Makes a new database's tables, or checks that an existing one is an index of this version.
pub(crate) fn prepare(conn: &Connection, path: &Path) -> Result<()> {
    let not_index = |reason: String| Error::NotAnIndex { path: path.to_path_buf(), reason };
    // The first read of a file that is not SQLite fails here ("file is not a database").
    let application_id: i64 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(|e| not_index(format!("not an SQLite database: {e}")))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(|e| not_index(format!("not an SQLite database: {e}")))?;
    if tables == 0 && application_id == 0 {
        // Tables, id and version in one transaction, made by one process when two start at once.
        let create = format!(
            "{CREATE} PRAGMA application_id = {APPLICATION_ID};
             INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');"
        );
        in_write_transaction(conn, path, || {
            let tables: i64 =
                conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0)).map_err(db(path))?;
            if tables == 0 {
                conn.execute_batch(&create).map_err(db(path))?;
            }
            Ok(())
        })?;
    }
    let application_id: i64 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(|e| not_index(format!("not an SQLite database: {e}")))?;
    if application_id != APPLICATION_ID {
        return Err(not_index("an SQLite database of another program".into()));
    }
    let version = get_meta(conn, path, "schema_version")?.ok_or_else(|| not_index("no schema version".into()))?;
    if version != SCHEMA_VERSION.to_string() {
        return Err(not_index(format!(
            "schema version {version}; this program reads version {SCHEMA_VERSION}: index again into a new file"
        )));
    }
    Ok(())
}

/// Records `model` in a database that has none; refuses a database recorded with another.
/// Check and record are one transaction: two first runs cannot both record theirs.
pub(crate) fn bind_model(conn: &Connection, path: &Path, model: &ModelIdentity) -> Result<()> {
    let mut refused = None;
    in_write_transaction(conn, path, || {
        match recorded_model(conn, path)? {
            None => {
                for (key, value) in [
                    ("model", model.model.as_str()),
                    ("model_config_blake3", &model.config_hash),
                    ("dtype", &model.dtype),
                    ("resize", &model.resize),
                    ("embedding_dim", &model.embedding_dim.to_string()),
                ] {
                    conn.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)", [key, value]).map_err(db(path))?;
                }
            }
            Some(recorded) if recorded == *model => {}
            Some(recorded) => {
                refused = Some(Error::OtherModel {
                    path: path.to_path_buf(),
                    recorded: recorded.describe(),
                    given: model.describe(),
                })
            }
        }
        Ok(())
    })?;
    refused.map_or(Ok(()), Err)
}

/// Records the captioning model of a database that has none (`None` when it has another).
pub(crate) fn bind_caption_model(conn: &Connection, path: &Path, model: &str) -> Result<Option<String>> {
    let mut other = None;
    in_write_transaction(conn, path, || {
        let recorded = get_meta(conn, path, "caption_model")?;
        match recorded {
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('caption_model', ?1)", [model])
                    .map_err(db(path))?;
            }
            Some(recorded) if recorded != model => other = Some(recorded),
            Some(_) => {}
        }
        Ok(())
    })?;
    Ok(other)
}

/// Runs `work` in a `BEGIN IMMEDIATE` transaction (the write lock taken first, so that what it
/// reads is still true when it writes), committed if it succeeds, rolled back otherwise.
fn in_write_transaction(conn: &Connection, path: &Path, work: impl FnOnce() -> Result<()>) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(db(path))?;
    match work().and_then(|()| conn.execute_batch("COMMIT").map_err(db(path))) {
        Ok(()) => Ok(()),
        Err(err) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(err)
        }
    }
}

/// SQLite's errors as this database's.
fn db(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Database { path: path.to_path_buf(), source }
}

/// The model the embeddings came from, once something was indexed.
pub(crate) fn recorded_model(conn: &Connection, path: &Path) -> Result<Option<ModelIdentity>> {
    let Some(model) = get_meta(conn, path, "model")? else { return Ok(None) };
    let field = |key: &str| -> Result<String> {
        get_meta(conn, path, key)?
            .ok_or_else(|| Error::NotAnIndex { path: path.to_path_buf(), reason: format!("meta has no {key}") })
    };
    let embedding_dim = field("embedding_dim")?.parse().map_err(|_| Error::NotAnIndex {
        path: path.to_path_buf(),
        reason: "meta.embedding_dim is not a number".into(),
    })?;
    Ok(Some(ModelIdentity {
        model,
        config_hash: field("model_config_blake3")?,
        dtype: field("dtype")?,
        resize: field("resize")?,
        embedding_dim,
    }))
}

pub(crate) fn get_meta(conn: &Connection, path: &Path, key: &str) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0))
        .optional()
        .map_err(|e| Error::NotAnIndex { path: path.to_path_buf(), reason: format!("cannot read its meta table: {e}") })
}
