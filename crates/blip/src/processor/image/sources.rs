//! Images as users name them: files, folders walked recursively, lists of paths on standard input
//! (`-`), and http(s) URLs fetched as transformers' `load_image` fetches them.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::image::RgbImage;

use super::decode::load_image_from_memory;
use crate::error::{Error, Result};

/// One image to read: a file, an http(s) URL, or a file found in a folder that could not be
/// listed (reported as that image's failure, so a run keeps its other images).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    File(PathBuf),
    Url(String),
    Unlisted { path: PathBuf, reason: String },
}

impl ImageSource {
    /// A command-line argument: an http(s) URL, else a path.
    pub fn parse(arg: &str) -> Self {
        if is_url(arg) {
            ImageSource::Url(arg.to_string())
        } else {
            ImageSource::File(PathBuf::from(arg))
        }
    }

    /// The file's path, for sources that are files.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageSource::File(path) | ImageSource::Unlisted { path, .. } => Some(path),
            ImageSource::Url(_) => None,
        }
    }

    /// The encoded image: the file's bytes, or the URL's body within `limits`.
    pub fn read(&self, limits: &UrlLimits) -> Result<Vec<u8>> {
        match self {
            ImageSource::File(path) => {
                std::fs::read(path).map_err(|e| Error::image(path, format!("cannot read image file: {e}")))
            }
            ImageSource::Url(url) => fetch_url(url, limits),
            ImageSource::Unlisted { path, reason } => Err(Error::image(path, reason)),
        }
    }

    /// The decoded image, as [`super::load_image`] decodes files.
    pub fn load(&self, limits: &UrlLimits) -> Result<RgbImage> {
        let bytes = self.read(limits)?;
        load_image_from_memory(&bytes, Path::new(&self.to_string()))
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::File(path) | ImageSource::Unlisted { path, .. } => write!(f, "{}", path.display()),
            ImageSource::Url(url) => f.write_str(url),
        }
    }
}

fn is_url(arg: &str) -> bool {
    let lower = arg.get(..8).unwrap_or(arg).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// How long a URL may take and how large its image may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlLimits {
    /// For the whole request (connection, redirects, body).
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl Default for UrlLimits {
    /// 30 seconds and 100 MiB.
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30), max_bytes: 100 << 20 }
    }
}

/// The body of an http(s) URL, as transformers' `load_image` reads it (`requests.get`, redirects
/// followed), within `limits`; any failure names the URL.
pub fn fetch_url(url: &str, limits: &UrlLimits) -> Result<Vec<u8>> {
    let agent = ureq::AgentBuilder::new().timeout(limits.timeout).redirects(5).build();
    let response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, response) => {
            Error::image(url, format!("cannot fetch the image: HTTP {code} {}", response.status_text()))
        }
        ureq::Error::Transport(transport) => Error::image(
            url,
            format!("cannot fetch the image (no network, or the server cannot be reached): {transport}"),
        ),
    })?;
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(limits.max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::image(url, format!("cannot read the image: {e}")))?;
    if bytes.len() > limits.max_bytes {
        return Err(Error::image(url, format!("the image is larger than the limit of {} bytes", limits.max_bytes)));
    }
    Ok(bytes)
}

/// The images named by command-line arguments, in order: an http(s) URL as it is, a folder as
/// the images under it ([`find_images`]), `-` as the lines of `stdin` (each read as an argument;
/// blank lines skipped), anything else as a file (a missing one fails when read).
pub fn collect_sources(args: &[String], stdin: &mut dyn BufRead) -> Result<Vec<ImageSource>> {
    let mut sources = Vec::new();
    let mut stdin_read = false;
    for arg in args {
        if arg == "-" {
            if std::mem::replace(&mut stdin_read, true) {
                continue;
            }
            for line in stdin.lines() {
                let line = line
                    .map_err(|e| Error::image("-", format!("cannot read the list of images on standard input: {e}")))?;
                let line = line.trim_end_matches('\r');
                if !line.trim().is_empty() {
                    push_source(line, &mut sources);
                }
            }
        } else {
            push_source(arg, &mut sources);
        }
    }
    Ok(sources)
}

fn push_source(arg: &str, sources: &mut Vec<ImageSource>) {
    let source = ImageSource::parse(arg);
    match &source {
        ImageSource::File(path) if path.is_dir() => sources.extend(find_images(path)),
        _ => sources.push(source),
    }
}

/// The images under `dir`, recursively, sorted by path (file names compared byte-wise at each
/// level), following symbolic links. Hidden entries (names starting with `.`) are skipped. A file
/// is taken when its content starts like an image this crate decodes, or when its extension names
/// one (so that a damaged `photo.jpg` is reported, not passed over); an entry that cannot be
/// listed is returned as [`ImageSource::Unlisted`].
pub fn find_images(dir: &Path) -> Vec<ImageSource> {
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| entry.depth() == 0 || !entry.file_name().to_string_lossy().starts_with('.'));
    let mut found = Vec::new();
    for entry in walk {
        match entry {
            Ok(entry) if entry.file_type().is_file() => {
                if is_image_file(entry.path()) {
                    found.push(ImageSource::File(entry.into_path()));
                }
            }
            Ok(_) => {}
            Err(err) => {
                let path = err.path().unwrap_or(dir).to_path_buf();
                let reason = match err.io_error() {
                    Some(io) => format!("cannot list this folder's entry: {io}"),
                    None => format!("cannot list this folder's entry: {err}"),
                };
                found.push(ImageSource::Unlisted { path, reason });
            }
        }
    }
    found
}

/// Extensions of the formats this crate decodes (lower case).
pub const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "jpe", "png", "gif", "bmp", "tif", "tiff", "webp"];

/// Whether `path` is an image file: its first bytes are an image's, or its extension is an
/// image's. An unreadable file counts when its extension does.
pub fn is_image_file(path: &Path) -> bool {
    let by_extension = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    if by_extension {
        return true;
    }
    let mut head = [0u8; 32];
    let Ok(mut file) = std::fs::File::open(path) else { return false };
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    starts_like_image(&head[..filled])
}

/// A BMP's DIB header size (bytes 14..18) is one of the known ones: "BM" alone also starts
/// text files.
fn is_bmp_header(head: &[u8]) -> bool {
    let size = head.get(14..18).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    matches!(size, Some(12 | 16 | 40 | 52 | 56 | 64 | 108 | 124))
}

/// The signatures of JPEG, PNG, GIF, BMP, TIFF (and BigTIFF) and WebP.
fn starts_like_image(head: &[u8]) -> bool {
    head.starts_with(&[0xFF, 0xD8, 0xFF])
        || head.starts_with(b"\x89PNG\r\n\x1a\n")
        || head.starts_with(b"GIF87a")
        || head.starts_with(b"GIF89a")
        || (head.starts_with(b"BM") && is_bmp_header(head))
        || head.starts_with(b"II*\0")
        || head.starts_with(b"MM\0*")
        || head.starts_with(b"II+\0")
        || head.starts_with(b"MM\0+")
        || (head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_urls_folders_and_stdin() {
        let dir = std::env::temp_dir().join(format!("blip-sources-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("b/nested")).unwrap();
        std::fs::create_dir_all(dir.join(".hidden")).unwrap();
        std::fs::write(dir.join("b/nested/z.png"), b"\x89PNG\r\n\x1a\nrest").unwrap();
        std::fs::write(dir.join("b/a.data"), b"GIF89a...").unwrap();
        std::fs::write(dir.join("a.JPG"), b"not really a jpeg").unwrap();
        std::fs::write(dir.join("notes.txt"), b"a caption").unwrap();
        std::fs::write(dir.join(".hidden/x.png"), b"\x89PNG\r\n\x1a\n").unwrap();
        let found: Vec<String> = find_images(&dir)
            .iter()
            .map(|s| s.path().unwrap().strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(found, ["a.JPG", "b/a.data", "b/nested/z.png"]);

        let args = ["https://example.com/cat.png".to_string(), "-".into(), dir.join("b").display().to_string()];
        let mut stdin = std::io::Cursor::new(b"one.jpg\r\n\n  \nHTTP://x/y.webp\n".to_vec());
        let sources = collect_sources(&args, &mut stdin).unwrap();
        assert_eq!(
            sources,
            [
                ImageSource::Url("https://example.com/cat.png".into()),
                ImageSource::File("one.jpg".into()),
                ImageSource::Url("HTTP://x/y.webp".into()),
                ImageSource::File(dir.join("b/a.data")),
                ImageSource::File(dir.join("b/nested/z.png")),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreachable_url_names_itself() {
        let limits = UrlLimits { timeout: Duration::from_secs(5), max_bytes: 10 };
        let err = ImageSource::Url("http://127.0.0.1:9/cat.png".into()).load(&limits).unwrap_err().to_string();
        assert!(err.starts_with("http://127.0.0.1:9/cat.png: cannot fetch the image"), "{err}");
    }
}
