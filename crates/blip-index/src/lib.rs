//! Image collections for BLIP: an SQLite database of images with their ITC embeddings (and
//! captions), kept up to date incrementally, searched by text or image.
//!
//! ```no_run
//! use blip_index::{Index, Indexer, ModelIdentity};
//! use blip::{Device, DType, ImageTextMatcher};
//!
//! # fn main() -> Result<(), blip_index::Error> {
//! let matcher = ImageTextMatcher::load(ImageTextMatcher::DEFAULT_MODEL, &Device::Cpu)?;
//! let mut index = Index::open("photos.db".as_ref())?;
//! let model = ModelIdentity::of(ImageTextMatcher::DEFAULT_MODEL, DType::F32, Default::default(), &matcher)?;
//! let indexer = Indexer::new(&matcher, model);
//! let files = blip::processor::image::find_images("photos".as_ref());
//! indexer.index(&mut index, &files, 8, &mut |_| {})?;
//! let query = matcher.embed_texts(&["a dog on a beach"])?.flatten_all()?.to_vec1::<f32>()?;
//! for hit in index.search(&query, 10)? {
//!     println!("{}\t{:.4}", hit.path, hit.itc);
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod indexer;
mod schema;
mod search;
mod store;

pub use error::{Error, Result};
pub use indexer::{Indexer, Progress, Summary};
pub use schema::{model_key, ModelIdentity, SCHEMA_VERSION};
pub use search::{rerank, Hit, Reranked};
pub use store::{ImageRecord, Index};
