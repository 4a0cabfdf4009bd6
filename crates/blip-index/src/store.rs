//! The index file: an SQLite database in WAL mode, one row per image, written a batch per
//! transaction so that a killed process loses at most the batch in flight.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::schema::{self, ModelIdentity};
use crate::search::Embeddings;

/// An image collection's database (see docs/COLLECTIONS.md for its tables).
pub struct Index {
    pub(crate) conn: Connection,
    pub(crate) path: PathBuf,
    /// The embeddings as one matrix, loaded on the first search and reloaded after writes.
    pub(crate) cache: Mutex<Option<Embeddings>>,
    /// Bumped by this connection's writes (SQLite's `data_version` counts only other connections').
    pub(crate) writes: AtomicU64,
}

/// One image's row.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    /// Absolute path of the file.
    pub path: String,
    /// BLAKE3 of the file's bytes (hex); `None` when it could not be read.
    pub hash: Option<String>,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Of the decoded image, after its EXIF orientation.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Unit-norm ITC image embedding.
    pub embedding: Option<Vec<f32>>,
    pub caption: Option<String>,
    pub caption_score: Option<f32>,
    /// Why the file could not be indexed.
    pub error: Option<String>,
}

/// What the index holds about a file, to tell whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub size: u64,
    pub mtime_ns: i64,
    pub hash: Option<String>,
    pub failed: bool,
    pub captioned: bool,
}

impl Index {
    /// Opens the index at `path`, creating it if there is no file there. A file that is not an
    /// index (another database, anything else, a damaged one) is refused with a clear error.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(|source| Error::Database { path: path.to_path_buf(), source })?;
        Self::with_connection(conn, path)
    }

    /// Opens an index that must exist (for searching).
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Query(format!(
                "{}: no such index; make one with `blip index --db {} FOLDER`",
                path.display(),
                path.display()
            )));
        }
        Self::open(path)
    }

    fn with_connection(conn: Connection, path: &Path) -> Result<Self> {
        let db = |source| Error::Database { path: path.to_path_buf(), source };
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        schema::prepare(&conn, path)?;
        // WAL: readers never block the writer, and a commit is durable once its frames are
        // synced; NORMAL syncs at checkpoints, which in WAL mode keeps the database consistent.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(db)?;
        Ok(Self { conn, path: path.to_path_buf(), cache: Mutex::new(None), writes: AtomicU64::new(0) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn db(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |source| Error::Database { path: self.path.clone(), source }
    }

    /// The model the embeddings came from; `None` before anything was indexed.
    pub fn model(&self) -> Result<Option<ModelIdentity>> {
        schema::recorded_model(&self.conn, &self.path)
    }

    /// Records `model` as this index's, or refuses it when the index was made with another.
    pub fn bind_model(&self, model: &ModelIdentity) -> Result<()> {
        schema::bind_model(&self.conn, &self.path, model)
    }

    /// Records the captioning model (a Hub id or folder) of an index without one, or refuses
    /// another: captions of two captioners would mix.
    pub fn bind_caption_model(&self, model: &str) -> Result<()> {
        let key = schema::model_key(model);
        match schema::bind_caption_model(&self.conn, &self.path, &key)? {
            None => Ok(()),
            Some(recorded) => Err(Error::OtherModel {
                path: self.path.clone(),
                recorded: format!("captions of {recorded}"),
                given: format!("captions of {key}"),
            }),
        }
    }

    /// Refuses to search with `model` unless it is the model the index was made with, unchanged.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<()> {
        match self.model()? {
            Some(recorded) if recorded == *model => Ok(()),
            Some(recorded) => Err(Error::Query(format!(
                "{}: made with {}, but the model now loads as {}: its checkpoint changed since; index again into a new --db",
                self.path.display(),
                recorded.describe(),
                model.describe()
            ))),
            None => Err(Error::Query(format!(
                "{}: the index is empty; add images with `blip index`",
                self.path.display()
            ))),
        }
    }

    /// Rows, failed files included.
    pub fn len(&self) -> Result<usize> {
        let n: i64 = self.conn.query_row("SELECT count(*) FROM images", [], |row| row.get(0)).map_err(self.db())?;
        Ok(n as usize)
    }

    /// Rows of files that could not be indexed (kept with their error until the file changes).
    pub fn failed(&self) -> Result<usize> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM images WHERE error IS NOT NULL", [], |row| row.get(0))
            .map_err(self.db())?;
        Ok(n as usize)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The row of `path` (as stored: absolute).
    pub fn get(&self, path: &str) -> Result<Option<ImageRecord>> {
        self.conn
            .query_row(
                "SELECT path, hash, size, mtime_ns, width, height, embedding, caption, caption_score, error
                 FROM images WHERE path = ?1",
                [path],
                |row| {
                    let embedding: Option<Vec<u8>> = row.get(6)?;
                    Ok(ImageRecord {
                        path: row.get(0)?,
                        hash: row.get(1)?,
                        size: row.get::<_, i64>(2)? as u64,
                        mtime_ns: row.get(3)?,
                        width: row.get(4)?,
                        height: row.get(5)?,
                        embedding: embedding.map(|bytes| from_le_bytes(&bytes)),
                        caption: row.get(7)?,
                        caption_score: row.get(8)?,
                        error: row.get(9)?,
                    })
                },
            )
            .optional()
            .map_err(self.db())
    }

    pub(crate) fn stored(&self, path: &str) -> Result<Option<Stored>> {
        self.conn
            .query_row(
                "SELECT size, mtime_ns, hash, error IS NOT NULL, caption IS NOT NULL FROM images WHERE path = ?1",
                [path],
                |row| {
                    Ok(Stored {
                        size: row.get::<_, i64>(0)? as u64,
                        mtime_ns: row.get(1)?,
                        hash: row.get(2)?,
                        failed: row.get(3)?,
                        captioned: row.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(self.db())
    }

    /// Writes `records` (replacing the rows of the same paths) and `touched` files' new size and
    /// modification time, in one transaction.
    /// Every embedding must have the width recorded for the index's model.
    pub fn add(&mut self, records: &[ImageRecord], touched: &[(String, u64, i64)]) -> Result<()> {
        if records.iter().any(|r| r.embedding.is_some()) {
            let dim = self.model()?.map(|m| m.embedding_dim).ok_or_else(|| {
                Error::Query(format!("{}: no model recorded yet (bind_model first)", self.path.display()))
            })?;
            if let Some(wrong) = records.iter().find(|r| r.embedding.as_ref().is_some_and(|e| e.len() != dim)) {
                return Err(Error::Query(format!(
                    "{}: an embedding of {} values where the index holds {dim}",
                    wrong.path,
                    wrong.embedding.as_ref().map_or(0, Vec::len)
                )));
            }
        }
        let path = self.path.clone();
        let db = move |source| Error::Database { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(&db)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO images (path, hash, size, mtime_ns, width, height, embedding, caption, caption_score, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT(path) DO UPDATE SET hash = ?2, size = ?3, mtime_ns = ?4, width = ?5, height = ?6,
                         embedding = ?7, caption = ?8, caption_score = ?9, error = ?10,
                         indexed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                )
                .map_err(&db)?;
            for r in records {
                let embedding = r.embedding.as_deref().map(to_le_bytes);
                insert
                    .execute(params![
                        r.path,
                        r.hash,
                        r.size as i64,
                        r.mtime_ns,
                        r.width,
                        r.height,
                        embedding,
                        r.caption,
                        r.caption_score,
                        r.error
                    ])
                    .map_err(&db)?;
            }
            let mut touch =
                tx.prepare_cached("UPDATE images SET size = ?2, mtime_ns = ?3 WHERE path = ?1").map_err(&db)?;
            for (path, size, mtime_ns) in touched {
                touch.execute(params![path, *size as i64, mtime_ns]).map_err(&db)?;
            }
        }
        crate::indexer::test_hook::before_commit();
        tx.commit().map_err(&db)?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes the rows of files that no longer exist (a file that cannot be checked, on a
    /// folder that cannot be read or a mount that is gone, is kept); returns how many.
    pub fn prune(&mut self) -> Result<usize> {
        let paths: Vec<String> = {
            let mut select = self.conn.prepare("SELECT path FROM images").map_err(self.db())?;
            let rows = select.query_map([], |row| row.get(0)).map_err(self.db())?;
            rows.collect::<std::result::Result<_, _>>().map_err(self.db())?
        };
        let gone: Vec<&String> =
            paths.iter().filter(|p| matches!(Path::new(p.as_str()).try_exists(), Ok(false))).collect();
        let path = self.path.clone();
        let db = move |source| Error::Database { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(&db)?;
        for path in &gone {
            tx.execute("DELETE FROM images WHERE path = ?1", [path]).map_err(&db)?;
        }
        tx.commit().map_err(&db)?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(gone.len())
    }
}

/// f32s as little-endian bytes: sqlite-vec's vector format, so `vec_distance_cosine` reads them.
fn to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
