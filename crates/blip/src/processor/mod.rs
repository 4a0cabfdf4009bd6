//! Inputs: image files to pixel tensors, text to token ids and back.

pub mod image;
pub mod text;
