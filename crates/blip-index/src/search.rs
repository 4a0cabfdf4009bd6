//! Exact nearest neighbours: every stored embedding against the query in one matrix product,
//! over a copy of the embeddings held in memory between searches (see docs/COLLECTIONS.md for why
//! not sqlite-vec's scan or an approximate index).

use std::sync::atomic::Ordering;

use blip::ops::linear::Linear;
use blip::{Device, Tensor};
use candle_core::Module;

use blip::{ImageTextMatcher, RgbImage};
use rusqlite::OptionalExtension;

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
    /// The embeddings as the weight of a linear layer: the library's few-row product reads each
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
        if query.len() != dim {
            return Err(Error::Query(format!(
                "the query embedding has {} values; the index's embeddings have {dim}",
                query.len()
            )));
        }
        if embeddings.ids.is_empty() {
            return Ok(vec![]);
        }
        let query = Tensor::from_slice(query, (1, dim), &Device::Cpu)?;
        let scores = embeddings.product.forward(&query)?.flatten_all()?.to_vec1::<f32>()?;
        let best = top_k(&scores, top);
        let ids: Vec<i64> = best.iter().map(|&i| embeddings.ids[i]).collect();
        drop(cache);
        let mut select =
            self.conn.prepare_cached("SELECT path, caption FROM images WHERE id = ?1").map_err(self.db())?;
        let mut hits = Vec::with_capacity(best.len());
        for (&i, id) in best.iter().zip(ids) {
            // A row deleted by another process since the embeddings were read is left out.
            let row = select.query_row([id], |row| Ok((row.get(0)?, row.get(1)?))).optional().map_err(self.db())?;
            if let Some((path, caption)) = row {
                hits.push(Hit { path, itc: scores[i], caption });
            }
        }
        Ok(hits)
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
            if Some(bytes.len()) != dim.checked_mul(4) {
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

/// A hit rescored by the ITM head.
#[derive(Debug, Clone, PartialEq)]
pub struct Reranked {
    pub hit: Hit,
    /// ITM match probability of the image and the query text.
    pub itm: f32,
}

/// `hits` ordered by the ITM probability of `text` with each image, read again from its file,
/// `batch_size` images per forward pass (ties keep the ITC order): ITC top-k, then ITM, as
/// BLIP's retrieval does. An image that cannot be read any more is left out, its error returned
/// beside the results. Needs a BlipForImageTextRetrieval matcher.
pub fn rerank(
    matcher: &ImageTextMatcher,
    text: &str,
    hits: Vec<Hit>,
    batch_size: usize,
) -> Result<(Vec<Reranked>, Vec<blip::Error>)> {
    if !matcher.has_itm_head() {
        return Err(Error::Query(
            "reranking needs an ITM head: this index's model is a BlipModel checkpoint; index with a BlipForImageTextRetrieval checkpoint"
                .into(),
        ));
    }
    let (mut reranked, mut failures) = (Vec::with_capacity(hits.len()), Vec::new());
    for chunk in hits.chunks(batch_size.max(1)) {
        let mut images: Vec<RgbImage> = Vec::with_capacity(chunk.len());
        let mut kept = Vec::with_capacity(chunk.len());
        for hit in chunk {
            match blip::load_image(hit.path.as_ref()) {
                Ok(image) => {
                    images.push(image);
                    kept.push(hit.clone());
                }
                Err(err) => failures.push(err),
            }
        }
        if images.is_empty() {
            continue;
        }
        let scores = matcher.match_texts(&images, &[text])?;
        for (hit, score) in kept.into_iter().zip(scores) {
            reranked.push(Reranked { hit, itm: score.first().and_then(|s| s.itm).unwrap_or(0.0) });
        }
    }
    reranked.sort_by(|a, b| b.itm.total_cmp(&a.itm));
    Ok((reranked, failures))
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
