//! Files on the wire: the bodies of the four file kinds (docs/PROTOCOL.md "Files").
//!
//! A file travels as one *offer* (`"kind":"file"`: its id, name, size, SHA-256, media
//! type and chunk size, authenticated like any inner message, so the hash is one the
//! sender signed), then *chunks* (`"kind":"file_chunk"`: the file id, an index and the
//! bytes), each an ordinary frame under the 256 KiB limit. The receiver tells the sender
//! how far it got (`"kind":"file_ack"`: the number of chunks it holds from the start, and
//! the probe it answers), and either side can stop a transfer (`"kind":"file_cancel"`).
//! Every field that decides a size or a path is checked here, so a receiver never
//! allocates or writes from a number a stranger chose.

use serde::{Deserialize, Deserializer, Serialize};

/// The wire name of a file offer.
pub const KIND_FILE: &str = "file";
/// The wire name of a chunk.
pub const KIND_FILE_CHUNK: &str = "file_chunk";
/// The wire name of a receiver's progress report.
pub const KIND_FILE_ACK: &str = "file_ack";
/// The wire name of a cancellation.
pub const KIND_FILE_CANCEL: &str = "file_cancel";

/// Largest chunk: its bytes, base64 in the inner JSON, base64 again in the frame, stay
/// under the 256 KiB frame limit with room for the v3 certificate and signature.
pub const MAX_CHUNK_BYTES: u32 = 128 * 1024;
/// Smallest chunk an offer may name (a file of more chunks than this allows would cost
/// a frame per few bytes).
pub const MIN_CHUNK_BYTES: u32 = 1024;
/// Largest file an offer may announce, whatever a receiver's own limit (which is
/// usually far lower): 2^40 bytes.
pub const MAX_OFFER_SIZE: u64 = 1 << 40;
/// Longest file name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest media type, in bytes.
pub const MAX_MEDIA_TYPE_BYTES: usize = 127;
/// Longest cancellation reason, in bytes.
pub const MAX_REASON_BYTES: usize = 64;
/// What a file of unknown type is.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// A file offer: `{"id":..,"name":..,"size":..,"sha256":..,"media_type":..,"chunk_size":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// The file id: 16 random bytes, base64url (the message id of the file in history).
    pub id: String,
    /// The file's name: no directories, no control characters.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of all its bytes, lower-case hex.
    pub sha256: String,
    /// Its media type (`type/subtype`).
    pub media_type: String,
    /// Bytes per chunk; every chunk but the last has exactly this many.
    pub chunk_size: u32,
    /// A number the receiver echoes in the `file_ack` that answers this offer (a sender
    /// sends the offer again, with a new number, to ask how far the receiver got). Not
    /// 0 from NES; 0 (absent) is answered too.
    #[serde(default)]
    pub probe: u64,
}

impl FileOffer {
    /// How many chunks the file has (0 for an empty file).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// How many bytes chunk `index` must hold (0 when there is no such chunk).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let cs = u64::from(self.chunk_size);
        if index >= self.chunks() {
            return 0;
        }
        (self.size - index * cs).min(cs)
    }

    /// Checks every field (see the module docs).
    pub fn check(&self) -> Result<(), FileError> {
        if !crate::inner::is_message_id(&self.id) {
            return Err(FileError::BadId);
        }
        check_name(&self.name)?;
        if self.size > MAX_OFFER_SIZE {
            return Err(FileError::TooLarge { size: self.size });
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_size) {
            return Err(FileError::ChunkSize {
                chunk_size: self.chunk_size,
            });
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(FileError::BadHash);
        }
        check_media_type(&self.media_type)
    }
}

/// Why a field of a file kind (an offer, or the file id and reason of the others) was
/// refused: [`FileOffer::check`] and the checks of [`crate::inner::Inner::parse`], and
/// the name and media type nesd is asked to send. Its own type so that a caller can
/// tell a bad name from a bad media type without reading the message; the messages
/// are shown to users and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// A file id (`id` of an offer, `file` of the others) is not a v2 message id.
    #[error("a file id is not 16 bytes of base64url")]
    BadId,
    /// A name empty or over [`MAX_NAME_BYTES`].
    #[error("a file name of {len} bytes; 1 to {MAX_NAME_BYTES}")]
    NameLength {
        /// Its length in bytes.
        len: usize,
    },
    /// A name that is `.` or `..`.
    #[error("a file name that is . or ..")]
    DotName,
    /// A name with `/`, `\` or a control character (line separators included).
    #[error("a file name with a slash or a control character")]
    NameCharacter,
    /// An offer over [`MAX_OFFER_SIZE`].
    #[error("a file of {size} bytes; at most 2^40")]
    TooLarge {
        /// The size it announces.
        size: u64,
    },
    /// A chunk size outside [`MIN_CHUNK_BYTES`]..=[`MAX_CHUNK_BYTES`].
    #[error("a chunk size of {chunk_size}; {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes")]
    ChunkSize {
        /// The chunk size it names.
        chunk_size: u32,
    },
    /// `sha256` is not 64 lower-case hex digits.
    #[error("a file hash that is not 64 lower-case hex digits")]
    BadHash,
    /// A media type that is not `type/subtype` of token characters, or too long.
    #[error("a media type that is not type/subtype")]
    MediaType,
    /// A cancellation reason that is not 1 to [`MAX_REASON_BYTES`] of `[a-z_]`.
    #[error("a cancellation reason that is not a short lower-case word")]
    BadReason,
}

/// Checks a file name: 1 to [`MAX_NAME_BYTES`] bytes, no `/` or `\`, no control
/// characters, not `.` or `..`: it is shown to users and becomes a file name on save.
pub fn check_name(name: &str) -> Result<(), FileError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(FileError::NameLength { len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(FileError::DotName);
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(FileError::NameCharacter);
    }
    Ok(())
}

/// Checks a media type: `type/subtype` of token characters, at most
/// [`MAX_MEDIA_TYPE_BYTES`] bytes.
pub fn check_media_type(media_type: &str) -> Result<(), FileError> {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match media_type.split_once('/') {
        Some((t, s)) if media_type.len() <= MAX_MEDIA_TYPE_BYTES && token(t) && token(s) => Ok(()),
        _ => Err(FileError::MediaType),
    }
}

/// One chunk: `{"file":..,"index":..,"data":..}` (`data` padded base64url).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileChunk {
    /// The file id of its offer.
    pub file: String,
    /// Its place: bytes `index * chunk_size ..`.
    pub index: u64,
    /// Its bytes (at most [`MAX_CHUNK_BYTES`]).
    #[serde(deserialize_with = "b64_bytes")]
    pub data: Vec<u8>,
}

/// A receiver's progress: `{"file":..,"have":..,"probe":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileAck {
    /// The file id.
    pub file: String,
    /// How many chunks from the first the receiver holds. Equal to the offer's chunk
    /// count only once the whole file matched its hash: the transfer is complete.
    pub have: u64,
    /// The probe this answers (an offer's `probe`), 0 for a report of progress.
    #[serde(default)]
    pub probe: u64,
}

/// A cancellation: `{"file":..,"reason":..}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileCancel {
    /// The file id.
    pub file: String,
    /// Why: `cancelled` (a user), `too_large` (over the receiver's limit), `hash_mismatch`,
    /// `busy`, or another word a later release adds.
    pub reason: String,
}

fn b64_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    // Checked before decoding, so a huge string is not decoded only to be refused.
    if text.len() > (MAX_CHUNK_BYTES as usize).div_ceil(3) * 4 {
        return Err(serde::de::Error::custom("a chunk over 128 KiB"));
    }
    let data = crate::b64::decode(&text)
        .ok_or_else(|| serde::de::Error::custom("chunk data that is not padded base64url"))?;
    if data.len() > MAX_CHUNK_BYTES as usize {
        return Err(serde::de::Error::custom("a chunk over 128 KiB"));
    }
    Ok(data)
}

/// Checks the file kinds' common fields (the file ids and reasons).
pub(crate) fn check_ref(file: &str) -> Result<(), FileError> {
    if crate::inner::is_message_id(file) {
        Ok(())
    } else {
        Err(FileError::BadId)
    }
}

/// Checks a cancellation's reason: 1 to [`MAX_REASON_BYTES`] of `[a-z_]`.
pub(crate) fn check_reason(reason: &str) -> Result<(), FileError> {
    if reason.is_empty()
        || reason.len() > MAX_REASON_BYTES
        || !reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return Err(FileError::BadReason);
    }
    Ok(())
}

/// Default `max_file_size`: 100 MiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 100 * 1024 * 1024;

/// Parses a size: a number of bytes, or a number with `K`, `M`, `G` (powers of 1024;
/// `KiB`, `MiB`, `GiB`, `KB`, `MB`, `GB` and lower case mean the same), e.g. `100MiB`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| SizeError::NotASize {
        text: text.to_owned(),
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(SizeError::UnknownUnit {
                text: text.to_owned(),
            })
        }
    };
    n.checked_mul(mult).ok_or_else(|| SizeError::TooLarge {
        text: text.to_owned(),
    })
}

/// Why [`parse_size`] refused a size (`max_file_size`, `--max-file-size`): a setting's
/// own error, apart from [`FileError`] (a file's fields), so that a configuration
/// error never reads as a refused file. The messages quote the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// It does not start with a number.
    #[error("{text:?} is not a size (e.g. 100MiB, 512K, 1048576)")]
    NotASize {
        /// The text as given.
        text: String,
    },
    /// The number is followed by something other than K, M, G (KiB, KB, ...) or B.
    #[error("{text:?}: unknown unit (K, M, G)")]
    UnknownUnit {
        /// The text as given.
        text: String,
    },
    /// More bytes than a `u64` holds.
    #[error("{text:?} is too large")]
    TooLarge {
        /// The text as given.
        text: String,
    },
}

/// A size for people: `1.2 MB` (powers of 1000, as file managers show them).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A guess of a media type from a file name's extension (what `nes send --file` and
/// D-Bus `SendFile` use when not told).
pub fn guess_media_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "md" => "text/plain",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        _ => OCTET_STREAM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> FileOffer {
        FileOffer {
            id: "AAAAAAAAAAAAAAAAAAAAAA==".into(),
            name: "report.pdf".into(),
            size: 300_000,
            sha256: "ab".repeat(32),
            media_type: "application/pdf".into(),
            chunk_size: MAX_CHUNK_BYTES,
            probe: 0,
        }
    }

    #[test]
    fn chunks_cover_the_file_exactly() {
        let o = offer();
        assert_eq!(o.chunks(), 3);
        assert_eq!(o.chunk_len(0), 131_072);
        assert_eq!(o.chunk_len(2), 300_000 - 2 * 131_072);
        assert_eq!(o.chunk_len(3), 0);
        let empty = FileOffer { size: 0, ..offer() };
        assert_eq!((empty.chunks(), empty.chunk_len(0)), (0, 0));
        let exact = FileOffer {
            size: 2 * 131_072,
            ..offer()
        };
        assert_eq!((exact.chunks(), exact.chunk_len(1)), (2, 131_072));
    }

    #[test]
    fn hostile_offers_are_refused() {
        assert!(offer().check().is_ok());
        for (bad, why) in [
            (
                FileOffer {
                    name: "../etc/passwd".into(),
                    ..offer()
                },
                "slash",
            ),
            (
                FileOffer {
                    name: "..".into(),
                    ..offer()
                },
                "dot dot",
            ),
            (
                FileOffer {
                    name: String::new(),
                    ..offer()
                },
                "empty name",
            ),
            (
                FileOffer {
                    name: "a\nb".into(),
                    ..offer()
                },
                "newline",
            ),
            (
                FileOffer {
                    name: "a\u{1b}[31m".into(),
                    ..offer()
                },
                "escape",
            ),
            (
                FileOffer {
                    name: "x".repeat(256),
                    ..offer()
                },
                "long name",
            ),
            (
                FileOffer {
                    size: MAX_OFFER_SIZE + 1,
                    ..offer()
                },
                "huge",
            ),
            (
                FileOffer {
                    chunk_size: MAX_CHUNK_BYTES + 1,
                    ..offer()
                },
                "big chunks",
            ),
            (
                FileOffer {
                    chunk_size: 1,
                    ..offer()
                },
                "tiny chunks",
            ),
            (
                FileOffer {
                    sha256: "AB".repeat(32),
                    ..offer()
                },
                "upper-case hash",
            ),
            (
                FileOffer {
                    sha256: "ab".into(),
                    ..offer()
                },
                "short hash",
            ),
            (
                FileOffer {
                    media_type: "pdf".into(),
                    ..offer()
                },
                "no slash",
            ),
            (
                FileOffer {
                    media_type: "a/b c".into(),
                    ..offer()
                },
                "space",
            ),
            (
                FileOffer {
                    id: "short".into(),
                    ..offer()
                },
                "bad id",
            ),
        ] {
            assert!(bad.check().is_err(), "{why}");
        }
    }

    #[test]
    fn chunk_data_must_be_padded_base64url_and_small() {
        let ok: FileChunk = serde_json::from_str(
            r#"{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":1,"data":"-_8APg=="}"#,
        )
        .unwrap();
        assert_eq!(ok.data, [0xfb, 0xff, 0x00, 0x3e]);
        assert!(serde_json::from_str::<FileChunk>(
            r#"{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":1,"data":"+/8APg=="}"#
        )
        .is_err());
        let big = crate::b64::encode(&vec![0u8; MAX_CHUNK_BYTES as usize + 1]);
        let json = format!(r#"{{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":0,"data":"{big}"}}"#);
        assert!(serde_json::from_str::<FileChunk>(&json).is_err());
        let max = crate::b64::encode(&vec![0u8; MAX_CHUNK_BYTES as usize]);
        let json = format!(r#"{{"file":"AAAAAAAAAAAAAAAAAAAAAA==","index":0,"data":"{max}"}}"#);
        assert!(serde_json::from_str::<FileChunk>(&json).is_ok());
    }

    #[test]
    fn sizes_parse_with_units_and_print_for_people() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("2 G"), Ok(2 << 30));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert_eq!(human_size(1_200_000), "1.2 MB");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(20 << 20), "21.0 MB");
    }

    #[test]
    fn refusals_say_what_they_said_as_strings() {
        let name = |n: &str| check_name(n).unwrap_err().to_string();
        assert_eq!(name(""), "a file name of 0 bytes; 1 to 255");
        assert_eq!(name(".."), "a file name that is . or ..");
        assert_eq!(
            name("a/b"),
            "a file name with a slash or a control character"
        );
        let chunk = FileOffer {
            chunk_size: 1,
            ..offer()
        };
        assert_eq!(
            chunk.check().unwrap_err(),
            FileError::ChunkSize { chunk_size: 1 }
        );
        assert_eq!(
            chunk.check().unwrap_err().to_string(),
            "a chunk size of 1; 1024 to 131072 bytes"
        );
        assert_eq!(
            check_media_type("pdf").unwrap_err().to_string(),
            "a media type that is not type/subtype"
        );
        assert_eq!(
            parse_size("ten").unwrap_err().to_string(),
            r#""ten" is not a size (e.g. 100MiB, 512K, 1048576)"#
        );
        assert_eq!(
            parse_size("5 parsecs").unwrap_err().to_string(),
            r#""5 parsecs": unknown unit (K, M, G)"#
        );
        assert!(matches!(
            parse_size("99999999999999G"),
            Err(SizeError::TooLarge { .. })
        ));
    }

    #[test]
    fn media_types_are_guessed_from_the_extension() {
        assert_eq!(guess_media_type("Report.PDF"), "application/pdf");
        assert_eq!(guess_media_type("noext"), OCTET_STREAM);
        assert!(check_media_type(guess_media_type("a.svg")).is_ok());
    }
}
