//! Item images: which names and formats an auction's pictures may have.

/// Most images one auction may have.
pub const MAX_IMAGES_PER_AUCTION: i64 = 10;

/// Longest image name, in bytes.
pub const MAX_NAME_LEN: usize = 100;

/// An image format gavel stores, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    Jpeg,
    Png,
    Webp,
}

impl ImageType {
    /// Bytes [`ImageType::sniff`] needs to tell every format apart.
    pub const SNIFF_LEN: usize = 12;

    pub fn content_type(self) -> &'static str {
        match self {
            ImageType::Jpeg => "image/jpeg",
            ImageType::Png => "image/png",
            ImageType::Webp => "image/webp",
        }
    }

    /// The format a `Content-Type` names (parameters ignored), if gavel stores it.
    pub fn declared(content_type: &str) -> Option<ImageType> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        [ImageType::Jpeg, ImageType::Png, ImageType::Webp]
            .into_iter()
            .find(|t| t.content_type().eq_ignore_ascii_case(essence))
    }

    /// The format whose signature `head` (the first [`ImageType::SNIFF_LEN`]
    /// bytes, or all of a shorter file) starts with.
    pub fn sniff(head: &[u8]) -> Option<ImageType> {
        match head {
            [0xFF, 0xD8, 0xFF, ..] => Some(ImageType::Jpeg),
            [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(ImageType::Png),
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(ImageType::Webp),
            _ => None,
        }
    }
}

/// Whether `name` may name an image: 1 to [`MAX_NAME_LEN`] letters, digits,
/// `.`, `_` or `-`, starting with a letter or digit (so it is one safe path
/// segment, in a URL and in a store's key).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_signatures() {
        assert_eq!(ImageType::sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]), Some(ImageType::Jpeg));
        assert_eq!(ImageType::sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"), Some(ImageType::Png));
        assert_eq!(ImageType::sniff(b"RIFF\x24\0\0\0WEBPVP8 "), Some(ImageType::Webp));
        assert_eq!(ImageType::sniff(b"RIFF\x24\0\0\0WAVEfmt "), None, "another RIFF file");
        assert_eq!(ImageType::sniff(b"GIF89a......"), None);
        assert_eq!(ImageType::sniff(b"<svg xmlns="), None);
        assert_eq!(ImageType::sniff(&[0xFF, 0xD8]), None, "too short to tell");
    }

    #[test]
    fn declared_types_ignore_case_and_parameters() {
        assert_eq!(ImageType::declared("image/png"), Some(ImageType::Png));
        assert_eq!(ImageType::declared("Image/JPEG; charset=binary"), Some(ImageType::Jpeg));
        assert_eq!(ImageType::declared("image/gif"), None);
        assert_eq!(ImageType::declared("application/octet-stream"), None);
    }

    #[test]
    fn names_are_one_safe_path_segment() {
        for good in ["front.jpg", "a", "IMG_0001-2.webp", &"x".repeat(MAX_NAME_LEN)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "..", "a/b", "a b", "ü.jpg", "%2e", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
