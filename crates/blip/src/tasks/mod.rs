//! What users ask of a checkpoint, end to end: images and text in, typed results out. The CLI
//! (and later a server) is a thin layer over these.

pub mod caption;
