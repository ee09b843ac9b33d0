//! Listing a subset's folder the way kohya's glob_images does, and reading caption files the way
//! its read_caption does, with the problems it would hit reported instead of raised.

use std::path::{Path, PathBuf};

use crate::error::BadFile;

/// kohya's IMAGE_EXTENSIONS (without the optional avif/jxl plugins). The match is case-sensitive
/// on Linux, as Python's glob is: `x.Png` is not picked up by kohya, nor by us.
pub const IMAGE_EXTENSIONS: &[&str] =
    &["png", "jpg", "jpeg", "webp", "bmp", "PNG", "JPG", "JPEG", "WEBP", "BMP"];

/// Caption extensions people use; when one exists beside an image but is not the configured one,
/// the caption is silently not used by kohya, which is the most common DreamBooth surprise.
const OTHER_CAPTION_EXTENSIONS: &[&str] = &[".txt", ".caption", ".tag", ".tags"];

#[derive(Debug, Default)]
pub(crate) struct FolderScan {
    /// Image candidates, sorted by path (kohya sorts the glob result).
    pub images: Vec<PathBuf>,
    pub problems: Vec<BadFile>,
    pub notes: Vec<String>,
}

/// Picture files kohya's glob does not pick up: formats it does not list, and listed extensions in
/// a case it does not match (`.Png`). They are skipped, with a note, since kohya skips them too.
fn is_unread_picture(name: &str) -> bool {
    const OTHER_PICTURES: &[&str] = &["gif", "tif", "tiff", "avif", "jxl", "heic", "heif"];
    match name.rsplit_once('.') {
        Some((_, ext)) => {
            let lower = ext.to_ascii_lowercase();
            OTHER_PICTURES.contains(&lower.as_str()) || IMAGE_EXTENSIONS.contains(&lower.as_str())
        }
        None => false,
    }
}

fn has_image_ext(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((_, ext)) => IMAGE_EXTENSIONS.contains(&ext),
        None => false,
    }
}

/// Lists one subset folder (not recursive, as kohya).
pub(crate) fn scan_folder(dir: &Path) -> FolderScan {
    let mut out = FolderScan::default();
    if !dir.exists() {
        out.problems.push(BadFile { path: dir.to_path_buf(), cause: "image_dir does not exist".into() });
        return out;
    }
    if !dir.is_dir() {
        out.problems.push(BadFile { path: dir.to_path_buf(), cause: "image_dir is not a directory".into() });
        return out;
    }
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            out.problems
                .push(BadFile { path: dir.to_path_buf(), cause: format!("cannot read directory: {e}") });
            return out;
        }
    };
    let mut hidden = 0usize;
    let mut unread: Vec<String> = Vec::new();
    for entry in rd {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                out.problems
                    .push(BadFile { path: dir.to_path_buf(), cause: format!("cannot list directory: {e}") });
                continue;
            }
        };
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name == "__MACOSX" {
                out.problems.push(BadFile {
                    path,
                    cause: "macOS archive metadata folder (__MACOSX), not part of the dataset; delete it"
                        .into(),
                });
            }
            continue;
        }
        if !has_image_ext(&name) {
            if is_unread_picture(&name) && !name.starts_with('.') {
                unread.push(name);
            }
            continue;
        }
        if name.starts_with("._") {
            out.problems.push(BadFile {
                path,
                cause: "macOS AppleDouble metadata file (._*), not an image; delete it".into(),
            });
            continue;
        }
        if name.starts_with('.') {
            // Python's glob("*.png") skips hidden files, so kohya never sees them.
            hidden += 1;
            continue;
        }
        out.images.push(path);
    }
    if hidden > 0 {
        out.notes.push(format!(
            "{}: ignored {hidden} hidden image file(s) (kohya does not see them)",
            dir.display()
        ));
    }
    if !unread.is_empty() {
        unread.sort();
        out.notes.push(format!(
            "{}: ignored {} picture file(s) that kohya does not read either (it reads .png .jpg .jpeg \
             .webp .bmp, all lower or all upper case; convert or rename them): {}",
            dir.display(),
            unread.len(),
            unread.join(", ")
        ));
    }
    // Python sorts str paths by code point; UTF-8 byte order is the same order.
    out.images.sort_by(|a, b| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
    out
}

/// Result of looking for an image's caption.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CaptionRead {
    Found { text: String, file: PathBuf },
    Missing,
}

/// kohya's read_caption: `<stem><ext>`, then the face-crop name `<stem minus the last 4
/// _-fields><ext>`; first line (stripped) unless wildcards are on, in which case all non-blank
/// lines joined with '\n'. A caption file with no lines is an error in kohya too.
pub(crate) fn read_caption(image: &Path, ext: &str, enable_wildcard: bool) -> Result<CaptionRead, String> {
    let full = image.to_string_lossy();
    let base = match full.rfind('.') {
        Some(i) if !full[i..].contains('/') => &full[..i],
        _ => &full[..],
    };
    // kohya splits the whole path (folders included) on '_', so we do too.
    let tokens: Vec<&str> = base.split('_').collect();
    let face_base = if tokens.len() >= 5 { tokens[..tokens.len() - 4].join("_") } else { base.to_string() };
    for cand in [format!("{base}{ext}"), format!("{face_base}{ext}")] {
        let p = PathBuf::from(&cand);
        if !p.is_file() {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| format!("caption file {cand}: cannot read: {e}"))?;
        let text = String::from_utf8(bytes).map_err(|_| format!("caption file {cand} is not valid UTF-8"))?;
        // A UTF-8 byte order mark would become part of the first tag; drop it.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        // Python's universal newlines: \r\n and \r end lines too.
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        if normalized.is_empty() {
            return Err(format!("caption file {cand} is empty"));
        }
        let lines: Vec<&str> = normalized.split_inclusive('\n').collect();
        let caption = if enable_wildcard {
            lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
        } else {
            lines.first().map(|l| l.trim().to_string()).unwrap_or_default()
        };
        return Ok(CaptionRead::Found { text: caption, file: p });
    }
    Ok(CaptionRead::Missing)
}

/// Other caption files beside `image` that exist but are not read with extension `ext`.
pub(crate) fn unused_caption_files(image: &Path, ext: &str) -> Vec<PathBuf> {
    OTHER_CAPTION_EXTENSIONS
        .iter()
        .filter(|e| **e != ext)
        .map(|e| image.with_extension(e.trim_start_matches('.')))
        .filter(|p| p.is_file())
        .collect()
}
