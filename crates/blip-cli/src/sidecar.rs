//! Sidecar files: one text file beside each image (`photo.jpg` → `photo.txt`), as kohya's
//! `make_captions.py` writes them for training image generators; written atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use blip::ImageSource;
use clap::Args;

/// `--caption-extension` and what to do with the files already there.
#[derive(Args)]
#[command(next_help_heading = "Sidecar files")]
pub struct SidecarArgs {
    /// Also write each image's result to a file beside it, named as the image with this
    /// extension (e.g. `.txt` or `.caption`: photo.jpg → photo.txt).
    #[arg(long, value_name = "EXT")]
    pub caption_extension: Option<String>,

    /// Leave images whose file already exists alone (they are not processed).
    #[arg(long, requires = "caption_extension", conflicts_with = "overwrite")]
    pub skip_existing: bool,

    /// Replace files that already exist.
    #[arg(long, requires = "caption_extension")]
    pub overwrite: bool,
}

impl SidecarArgs {
    /// The sidecars asked for, if any; an extension that is no file extension is refused.
    pub fn sidecars(&self) -> anyhow::Result<Option<Sidecars>> {
        let Some(extension) = &self.caption_extension else { return Ok(None) };
        let bare = extension.strip_prefix('.').unwrap_or(extension);
        if bare.is_empty() || bare.contains(['/', '\\']) || bare.starts_with('.') {
            anyhow::bail!("--caption-extension {extension:?}: give a file extension such as .txt or .caption");
        }
        if blip::processor::image::IMAGE_EXTENSIONS.contains(&bare.to_ascii_lowercase().as_str()) {
            anyhow::bail!(
                "--caption-extension {extension:?} is an image extension: the files would replace images; use .txt or .caption"
            );
        }
        let existing = if self.skip_existing {
            Existing::Skip
        } else if self.overwrite {
            Existing::Overwrite
        } else {
            Existing::Refuse
        };
        Ok(Some(Sidecars { extension: format!(".{bare}"), existing }))
    }
}

/// What happens to an image whose sidecar file exists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// The image is a failure, so that no hand-edited file is lost (the default).
    Refuse,
    Skip,
    Overwrite,
}

/// Where each image's sidecar file goes and how it is written.
pub struct Sidecars {
    /// With its leading dot.
    extension: String,
    existing: Existing,
}

impl Sidecars {
    /// The image's path with the extension replaced, as kohya's scripts name it.
    fn path_for(&self, image: &ImageSource) -> Result<PathBuf, String> {
        match image {
            ImageSource::File(path) => {
                let mut name = path.file_stem().unwrap_or_default().to_os_string();
                name.push(&self.extension);
                Ok(path.with_file_name(name))
            }
            _ => Err(format!("{image}: an image from a URL has no folder to write its {} file in", self.extension)),
        }
    }

    /// Sorts the images before any model work: those to process, those passed over
    /// (`--skip-existing` and their file is there), and those refused (their file is there
    /// without a flag saying what to do, another image writes the same file, or a URL).
    pub fn plan(&self, images: Vec<ImageSource>) -> Plan {
        let mut plan = Plan { todo: Vec::with_capacity(images.len()), skipped: 0, refused: Vec::new() };
        let mut claimed: std::collections::HashMap<PathBuf, String> = std::collections::HashMap::new();
        for image in images {
            let path = match self.path_for(&image) {
                Ok(path) => path,
                Err(refusal) => {
                    plan.refused.push(refusal);
                    continue;
                }
            };
            if let Some(first) = claimed.get(&path) {
                plan.refused.push(format!("{image}: {first} writes {} too; rename one of them", path.display()));
                continue;
            }
            claimed.insert(path.clone(), image.to_string());
            match (path.exists(), self.existing) {
                (true, Existing::Skip) => plan.skipped += 1,
                (true, Existing::Refuse) => plan.refused.push(format!(
                    "{}: already exists; add --overwrite to replace it or --skip-existing to keep it",
                    path.display()
                )),
                _ => plan.todo.push(image),
            }
        }
        plan
    }

    /// Writes `text` and a newline to the image's file: to a temporary file in the same folder,
    /// then renamed over it, so that an interrupted run never leaves half a file.
    pub fn write(&self, image: &ImageSource, text: &str) -> Result<(), String> {
        let path = self.path_for(image)?;
        if self.existing != Existing::Overwrite && path.exists() {
            return Err(format!(
                "{}: already exists; add --overwrite to replace it or --skip-existing to keep it",
                path.display()
            ));
        }
        write_atomically(&path, format!("{text}\n").as_bytes(), self.existing == Existing::Overwrite)
            .map_err(|e| format!("{}: cannot write: {e}", path.display()))
    }
}

/// `bytes` to `path` through a temporary file beside it; without `replace`, a file that appeared
/// meanwhile is kept and the write refused.
fn write_atomically(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(path.file_name().unwrap_or_default());
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        if replace {
            std::fs::rename(&temporary, path)
        } else {
            // A hard link fails when the destination exists: never replaces.
            std::fs::hard_link(&temporary, path).and_then(|()| std::fs::remove_file(&temporary))
        }
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// The images of a run with sidecars, sorted before any model work.
pub struct Plan {
    pub todo: Vec<ImageSource>,
    pub skipped: usize,
    pub refused: Vec<String>,
}

/// What happened to the images' files.
#[derive(Default)]
pub struct Tally {
    pub written: usize,
    pub skipped: usize,
    pub failed: usize,
}

impl Tally {
    /// The run's last line: "12 .txt files written, 3 skipped (already there), 1 failed".
    pub fn summary(&self, sidecars: &Sidecars) -> String {
        format!(
            "{} {} files written, {} skipped (already there), {} failed",
            self.written, sidecars.extension, self.skipped, self.failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_as_the_image_and_never_clobbered_by_default() {
        let dir = std::env::temp_dir().join(format!("blip-sidecar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = ImageSource::File(dir.join("photo.final.jpg"));
        let args =
            |skip, overwrite| SidecarArgs { caption_extension: Some("txt".into()), skip_existing: skip, overwrite };
        let refuse = args(false, false).sidecars().unwrap().unwrap();
        assert_eq!(refuse.path_for(&image).unwrap(), dir.join("photo.final.txt"));
        refuse.write(&image, "a cat").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("photo.final.txt")).unwrap(), "a cat\n");
        assert!(refuse.write(&image, "a dog").unwrap_err().contains("already exists"));
        let plan = args(true, false).sidecars().unwrap().unwrap().plan(vec![image.clone()]);
        assert_eq!((plan.todo.len(), plan.skipped), (0, 1));
        let twin = ImageSource::File(dir.join("photo.final.png"));
        let plan = args(false, true).sidecars().unwrap().unwrap().plan(vec![image.clone(), twin]);
        assert_eq!(plan.todo, std::slice::from_ref(&image));
        assert!(
            plan.refused[0].contains("writes") && plan.refused[0].contains("photo.final.txt"),
            "{:?}",
            plan.refused
        );
        assert!(SidecarArgs { caption_extension: Some(".JPG".into()), skip_existing: false, overwrite: true }
            .sidecars()
            .is_err());
        args(false, true).sidecars().unwrap().unwrap().write(&image, "a dog").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("photo.final.txt")).unwrap(), "a dog\n");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["photo.final.txt"], "no temporary file left");
        assert!(SidecarArgs { caption_extension: Some(".".into()), skip_existing: false, overwrite: false }
            .sidecars()
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
