//! Images as requests carry them: raw bytes, base64 (plain or as a `data:` URL), or an
//! http(s) URL fetched by the server when `--allow-image-urls` permits (server-side fetching
//! lets a client make the server reach any address it can: off by default).

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use blip::RgbImage;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Where URL images may come from and how much may be read.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    pub allowed: bool,
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// An image named in a JSON body, not yet decoded.
#[derive(Debug, Clone)]
pub enum ImageSource {
    Bytes(Vec<u8>),
    Url(String),
}

impl ImageSource {
    /// Reads `text`: an http(s) URL, a `data:...;base64,` URL, or bare base64.
    pub fn parse(text: &str, field: &str) -> Result<Self, ApiError> {
        let trimmed = text.trim();
        if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
            return Ok(ImageSource::Url(trimmed.to_string()));
        }
        let data = match trimmed.strip_prefix("data:") {
            Some(rest) => match rest.split_once(',') {
                Some((kind, data)) if kind.ends_with(";base64") => data,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_image",
                        format!("{field}: a data URL must be base64 (data:image/...;base64,...)"),
                    ))
                }
            },
            None => trimmed,
        };
        decode_base64(data, field).map(ImageSource::Bytes)
    }

    /// The decoded image passed through `then` (the model's preprocessing); fetching a URL
    /// (when allowed), decoding and `then` run on a blocking thread, at most as many at once as
    /// `limit` has permits, so that memory for decoded images stays bounded.
    pub async fn load<T: Send + 'static>(
        self,
        policy: &UrlPolicy,
        field: &str,
        limit: &Semaphore,
        then: impl FnOnce(RgbImage) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let _permit = limit.acquire().await.map_err(|_| ApiError::internal("the server is shutting down"))?;
        let policy = policy.clone();
        let field = field.to_string();
        tokio::task::spawn_blocking(move || {
            let bytes = match self {
                ImageSource::Bytes(bytes) => bytes,
                ImageSource::Url(url) => fetch(&url, &policy, &field)?,
            };
            then(decode(&bytes, &field)?)
        })
        .await
        .map_err(|e| ApiError::internal(format!("decoding the image failed: {e}")))?
    }
}

/// An encoded image in memory, decoded as `blip` decodes files.
pub fn decode(bytes: &[u8], field: &str) -> Result<RgbImage, ApiError> {
    Ok(blip::load_image_from_memory(bytes, Path::new(field))?)
}

/// Standard base64, padded or not, with white space around it.
pub fn decode_base64(data: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(data.trim())
        .map_err(|e| ApiError::bad_request("invalid_base64", format!("{field} must be a base64-encoded image: {e}")))
}

fn fetch(url: &str, policy: &UrlPolicy, field: &str) -> Result<Vec<u8>, ApiError> {
    if !policy.allowed {
        return Err(ApiError::bad_request(
            "invalid_image",
            format!("{field}: image URLs are off on this server (start it with --allow-image-urls); send the image as base64"),
        ));
    }
    let limits = blip::UrlLimits { timeout: policy.timeout, max_bytes: policy.max_bytes };
    blip::processor::image::fetch_url(url, &limits)
        .map_err(|e| ApiError::bad_request("invalid_image", format!("{field}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_data_urls() {
        let bytes = |s: &str| match ImageSource::parse(s, "inputs").unwrap() {
            ImageSource::Bytes(b) => b,
            ImageSource::Url(u) => panic!("{u}"),
        };
        assert_eq!(bytes("aGVsbG8="), b"hello");
        assert_eq!(bytes(" aGVsbG8 "), b"hello");
        assert_eq!(bytes("data:image/png;base64,aGVsbG8"), b"hello");
        assert!(matches!(ImageSource::parse("https://x/y.png", "inputs").unwrap(), ImageSource::Url(_)));
        assert_eq!(ImageSource::parse("%%%", "inputs").unwrap_err().kind, "invalid_base64");
        assert_eq!(ImageSource::parse("data:image/png,raw", "inputs").unwrap_err().kind, "invalid_image");
    }
}
