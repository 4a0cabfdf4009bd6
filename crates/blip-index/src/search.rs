//! Exact nearest neighbours: every stored embedding against the query in one matrix product,
//! over a copy of the embeddings held in memory between searches (see docs/INDEX.md for why
//! not sqlite-vec's scan or an approximate index).

use std::sync::atomic::Ordering;

use blip::ops::linear::Linear;
use blip::{Device, Tensor};
use candle_core::Module;

use crate::error::{Error, Result};
use crate::store::{from_le_bytes, Index};

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub path: String,
    /// Cosine similarity of the unit-norm embeddings (what `blip match` calls itc).
    pub itc: f32,
    pub caption: Option<String>,
}

/// The embedded images' ids and embeddings [n, dim], as of a version of the database.
pub(crate) struct Embeddings {
    version: (i64, u64),
    ids: Vec<i64>,
    /// The embeddings as the weight of a linear layer: the library's one-row product reads each
    /// once, on all threads, as a decoding step reads a weight matrix.
    product: Linear,
    dim: usize,
}

impl Index {
    /// The `top` images nearest to the unit-norm `query` (a text's or an image's embedding),
    /// most similar first; ties in insertion order.
    pub fn search(&self, query: &[f32], top: usize) -> Result<Vec<Hit>> {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let version = self.version()?;
        if cache.as_ref().is_none_or(|cached| cached.version != version) {
            *cache = Some(self.load_embeddings(version)?);
        }
        let embeddings = cache.as_ref().expect("loaded above");
        let dim = embeddings.dim;
        if embeddings.ids.is_empty() {
            return Ok(vec![]);
        }
        if query.len() != dim {
            return Err(Error::Query(format!(
                "the query embedding has {} values; the index's embeddings have {dim}",
                query.len()
            )));
        }
        let query = Tensor::from_slice(query, (1, dim), &Device::Cpu)?;
        let scores = embeddings.product.forward(&query)?.flatten_all()?.to_vec1::<f32>()?;
        let best = top_k(&scores, top);
        let ids: Vec<i64> = best.iter().map(|&i| embeddings.ids[i]).collect();
        drop(cache);
        let mut select =
            self.conn.prepare_cached("SELECT path, caption FROM images WHERE id = ?1").map_err(self.db())?;
        best.iter()
            .zip(ids)
            .map(|(&i, id)| {
                let (path, caption) =
                    select.query_row([id], |row| Ok((row.get(0)?, row.get(1)?))).map_err(self.db())?;
                Ok(Hit { path, itc: scores[i], caption })
            })
            .collect()
    }

    /// Changes when anyone commits to the database: SQLite's `data_version` for other
    /// connections, our own count for this one.
    fn version(&self) -> Result<(i64, u64)> {
        let data_version: i64 = self.conn.query_row("PRAGMA data_version", [], |row| row.get(0)).map_err(self.db())?;
        Ok((data_version, self.writes.load(Ordering::Relaxed)))
    }

    fn load_embeddings(&self, version: (i64, u64)) -> Result<Embeddings> {
        let dim = self.model()?.map_or(0, |m| m.embedding_dim);
        let mut select = self
            .conn
            .prepare("SELECT id, embedding FROM images WHERE embedding IS NOT NULL ORDER BY id")
            .map_err(self.db())?;
        let mut rows = select.query([]).map_err(self.db())?;
        let (mut ids, mut data) = (Vec::new(), Vec::new());
        while let Some(row) = rows.next().map_err(self.db())? {
            let bytes = row.get_ref(1).and_then(|v| Ok(v.as_blob()?)).map_err(self.db())?;
            if bytes.len() != dim * 4 {
                return Err(Error::NotAnIndex {
                    path: self.path.clone(),
                    reason: format!("an embedding of {} bytes where {dim} f32s were recorded", bytes.len()),
                });
            }
            ids.push(row.get(0).map_err(self.db())?);
            data.extend(from_le_bytes(bytes));
        }
        let matrix = Tensor::from_vec(data, (ids.len(), dim), &Device::Cpu)?;
        Ok(Embeddings { version, ids, product: Linear::new(matrix, None)?, dim })
    }
}

/// Indices of the `k` largest scores, largest first, lower index first among equals.
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut indices: Vec<usize> = (0..scores.len()).collect();
    if k < indices.len() {
        indices.select_nth_unstable_by(k, order);
        indices.truncate(k);
    }
    indices.sort_unstable_by(order);
    indices
}

#[cfg(test)]
mod tests {
    #[test]
    fn top_k_is_ordered_and_stable() {
        let scores = [0.1, 0.9, 0.5, 0.9, -1.0];
        assert_eq!(super::top_k(&scores, 3), [1, 3, 2]);
        assert_eq!(super::top_k(&scores, 10), [1, 3, 2, 0, 4]);
        assert_eq!(super::top_k(&scores, 0), Vec::<usize>::new());
    }
}
