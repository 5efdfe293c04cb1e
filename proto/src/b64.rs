//! Base64 as the wire uses it: the URL-safe alphabet *with* `=` padding, exactly Go's
//! `base64.URLEncoding`. The original decoder requires the padding, so we always write it;
//! we also require it on read, so a frame has one spelling only.

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;

/// Encodes bytes as padded base64url.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE.encode(bytes)
}

/// Decodes padded base64url; `None` on any other alphabet, missing padding or garbage.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    URL_SAFE.decode(text.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_padding_and_url_alphabet() {
        let bytes = [0xfb, 0xff, 0x00, 0x3e];
        let text = encode(&bytes);
        assert_eq!(text, "-_8APg==");
        assert_eq!(decode(&text).as_deref(), Some(&bytes[..]));
    }

    #[test]
    fn refuses_standard_alphabet_and_missing_padding() {
        assert_eq!(decode("+/8APg=="), None);
        assert_eq!(decode("-_8APg"), None);
        assert_eq!(decode("not base64!"), None);
    }
}
