//! Text from the network, made safe to show a person.
//!
//! A message's text (and anything else a sender chooses) is shown by terminals, the
//! ratatui chat and notification servers, all of which give some characters a meaning:
//! escape sequences clear the screen or retitle the window, a newline or carriage return
//! starts a line that looks like another sender's, bidi overrides reorder what is shown,
//! and invisible format characters hide or smuggle content. [`line`] turns any text into
//! one line that shows every such character escaped, and leaves all other text (any
//! script, emoji, combining marks) exactly as it is:
//!
//! | what | shown as |
//! |---|---|
//! | newline, carriage return | `\n`, `\r` |
//! | tab | one space |
//! | other C0 controls (ESC, BEL, BS, VT, FF, NUL, ...), DEL, C1 controls (U+0080–U+009F) | `\u{HEX}`, e.g. `\u{1b}` |
//! | bidi embeddings, overrides, isolates and marks (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F, U+061C) | `\u{HEX}` |
//! | other invisible format characters (Unicode category Cf: U+200B, U+2060, U+FEFF, U+00AD, tags U+E0000–U+E007F, ...), line and paragraph separators, Hangul fillers | `\u{HEX}` |
//!
//! Two format characters are part of ordinary text and stay when they join two visible
//! non-ASCII characters: ZWNJ and ZWJ (U+200C, U+200D: Persian and Indic words, emoji
//! sequences such as 👩‍💻). Between ASCII letters, next to a space or at an end they are
//! escaped. Likewise tag characters stay only in an emoji flag sequence (🏴 followed by
//! a few tags and CANCEL TAG, e.g. the flag of Scotland).
//!
//! The escaped form is for reading, not a reversible encoding: a sender who types a
//! literal `\u{1b}` looks the same as one who sent ESC. Scripts that need the exact text
//! read `--json`, which is never escaped.
//!
//! [`line_max`] also cuts the result to a number of characters without splitting an
//! escape; [`markup`] escapes `&`, `<` and `>` for notification bodies (servers that
//! announce `body-markup` interpret a subset of HTML).

use std::fmt::Write as _;

/// `text` as one line with every control, bidi and invisible format character escaped
/// (see the module docs).
pub fn line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for piece in pieces(text) {
        out.push_str(piece.as_str());
    }
    out
}

/// [`line`] cut to at most `max` characters (at least 1), the cut marked with `…`. An
/// escape is kept whole or left out, never split.
pub fn line_max(text: &str, max: usize) -> String {
    let max = max.max(1);
    let all: Vec<Piece> = pieces(text).collect();
    let total: usize = all.iter().map(Piece::chars).sum();
    if total <= max {
        return all.iter().map(Piece::as_str).collect();
    }
    let mut out = String::new();
    let mut used = 0;
    for piece in &all {
        if used + piece.chars() > max - 1 {
            break;
        }
        used += piece.chars();
        out.push_str(piece.as_str());
    }
    out.push('…');
    out
}

/// `&`, `<`, `>` as entities, for notification bodies that servers read as markup. Apply
/// it last (after [`line_max`]) so that no cut falls inside an entity.
pub fn markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Whether `c` is always shown escaped, wherever it stands.
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || is_format(c) || matches!(c, '\u{2028}' | '\u{2029}') || is_filler(c)
}

/// One shown unit: a character as it is, or the escape standing for one.
enum Piece<'a> {
    Text(&'a str),
    Escaped(String),
}

impl Piece<'_> {
    fn as_str(&self) -> &str {
        match self {
            Piece::Text(s) => s,
            Piece::Escaped(s) => s,
        }
    }

    fn chars(&self) -> usize {
        self.as_str().chars().count()
    }
}

/// `text` split into what is shown: runs of safe characters (borrowed) and escapes.
fn pieces(text: &str) -> impl Iterator<Item = Piece<'_>> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        if c == BLACK_FLAG {
            if let Some(len) = flag_tags(&chars[i + 1..]) {
                // The flag and its tags, kept as they are.
                let end = chars
                    .get(i + 1 + len)
                    .map(|&(b, _)| b)
                    .unwrap_or(text.len());
                out.push(Piece::Text(&text[at..end]));
                i += 1 + len;
                continue;
            }
        }
        let keep = if matches!(c, ZWNJ | ZWJ) {
            let prev = i.checked_sub(1).map(|p| chars[p].1);
            let next = chars.get(i + 1).map(|&(_, n)| n);
            prev.is_some_and(joinable) && next.is_some_and(joinable)
        } else {
            !is_unsafe(c)
        };
        if keep {
            out.push(Piece::Text(&text[at..at + c.len_utf8()]));
        } else {
            out.push(Piece::Escaped(escape(c)));
        }
        i += 1;
    }
    out.into_iter()
}

/// The escaped form of one character.
fn escape(c: char) -> String {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => " ".into(),
        c => {
            let mut s = String::new();
            // Writing to a String cannot fail.
            let _ = write!(s, "\\u{{{:x}}}", c as u32);
            s
        }
    }
}

const ZWNJ: char = '\u{200C}';
const ZWJ: char = '\u{200D}';
/// WAVING BLACK FLAG, the base of emoji tag sequences (subdivision flags).
const BLACK_FLAG: char = '\u{1F3F4}';
const CANCEL_TAG: char = '\u{E007F}';

/// A character a ZWNJ/ZWJ may join: visible and not ASCII (letters of scripts that need
/// joiners, emoji, variation selectors and skin tones).
fn joinable(c: char) -> bool {
    !c.is_ascii() && !c.is_whitespace() && !is_unsafe(c) && !matches!(c, ZWNJ | ZWJ)
}

/// How many characters after a 🏴 form its flag tag sequence (tag letters and digits,
/// then CANCEL TAG), if they do. Subdivision codes have at most 7 tags (`gbsct` has 5).
fn flag_tags(after: &[(usize, char)]) -> Option<usize> {
    let tags = after
        .iter()
        .take_while(|&&(_, c)| ('\u{E0030}'..='\u{E007A}').contains(&c))
        .count();
    let ends = after.get(tags).is_some_and(|&(_, c)| c == CANCEL_TAG);
    ((1..=7).contains(&tags) && ends).then_some(tags + 1)
}

/// Unicode general category Cf (format characters, Unicode 15.1), plus the unassigned
/// default-ignorable code points next to them (a newer Unicode may fill them).
fn is_format(c: char) -> bool {
    matches!(c as u32,
        0x00AD
        | 0x0600..=0x0605
        | 0x061C
        | 0x06DD
        | 0x070F
        | 0x0890..=0x0891
        | 0x08E2
        | 0x180E
        | 0x200B..=0x200F
        | 0x202A..=0x202E
        | 0x2060..=0x206F
        | 0xFEFF
        | 0xFFF9..=0xFFFB
        | 0x110BD
        | 0x110CD
        | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A
        | 0xE0000..=0xE00FF
        | 0xE01F0..=0xE0FFF)
}

/// Letters that draw nothing (Hangul fillers), a known way to make a blank-looking text.
fn is_filler(c: char) -> bool {
    matches!(c, '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged() {
        for text in [
            "hello, world!",
            "zażółć gęślą jaźń",
            "日本語のテキスト",
            "مرحبا بالعالم",       // Arabic letters: fine, only overrides are not
            "שלום עולם",           // Hebrew
            "می‌خواهم",             // Persian with a ZWNJ between letters
            "क्‍ष",                  // Devanagari with a ZWJ
            "e\u{301}le\u{300}ve", // combining marks
            "👍🏽 🎉 ❤️ 👩‍💻 👨‍👩‍👧",
            "🏴\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}", // flag of Scotland
            "a\\u{1b}b C:\\dir",                                        // backslashes stay as typed
            "",
        ] {
            assert_eq!(line(text), text, "{text:?}");
        }
    }

    #[test]
    fn c0_controls_del_and_c1_are_escaped() {
        assert_eq!(line("\x1b]0;pwned\x07"), "\\u{1b}]0;pwned\\u{7}");
        assert_eq!(line("\x1b[2J"), "\\u{1b}[2J");
        assert_eq!(line("a\x08b\x00c\x0b\x0c"), "a\\u{8}b\\u{0}c\\u{b}\\u{c}");
        assert_eq!(line("x\x7fy"), "x\\u{7f}y");
        assert_eq!(
            line("\u{85}\u{9b}2J"),
            "\\u{85}\\u{9b}2J",
            "NEL and CSI (C1)"
        );
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let shown = line(&c.to_string());
            assert!(!shown.chars().any(char::is_control), "{c:?} -> {shown:?}");
        }
    }

    #[test]
    fn line_ends_never_start_a_line_and_tabs_become_spaces() {
        assert_eq!(line("hi\nmallory: fake line"), "hi\\nmallory: fake line");
        assert_eq!(line("a\r\nb\rc"), "a\\r\\nb\\rc");
        assert_eq!(line("a\tb"), "a b");
        assert_eq!(line("a\u{2028}b\u{2029}c"), "a\\u{2028}b\\u{2029}c");
    }

    #[test]
    fn bidi_controls_are_escaped() {
        for c in [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}',
        ] {
            assert_eq!(line(&format!("a{c}b")), format!("a\\u{{{:x}}}b", c as u32));
        }
        assert_eq!(line("invoice\u{202E}fdp.exe"), "invoice\\u{202e}fdp.exe");
    }

    #[test]
    fn invisible_format_characters_are_escaped() {
        assert_eq!(line("pay\u{200B}pal"), "pay\\u{200b}pal");
        assert_eq!(line("\u{FEFF}hi"), "\\u{feff}hi");
        assert_eq!(line("a\u{2060}b\u{00AD}c"), "a\\u{2060}b\\u{ad}c");
        assert_eq!(line("\u{3164}"), "\\u{3164}");
        // Tags smuggling ASCII ("hi") after an ordinary letter.
        assert_eq!(line("x\u{E0068}\u{E0069}"), "x\\u{e0068}\\u{e0069}");
        // A flag with too many tags is not a flag sequence.
        let long = format!("🏴{}\u{E007F}", "\u{E0061}".repeat(20));
        assert!(line(&long).starts_with("🏴\\u{e0061}"), "{}", line(&long));
        // Joiners where they would hide something: between ASCII letters, next to a
        // space, at the ends.
        assert_eq!(line("ad\u{200D}min"), "ad\\u{200d}min");
        assert_eq!(line("\u{200C}x"), "\\u{200c}x");
        assert_eq!(line("日 \u{200D}日"), "日 \\u{200d}日");
        assert_eq!(line("日\u{200D}"), "日\\u{200d}");
        assert_eq!(line("日\u{200D}\u{200D}日"), "日\\u{200d}\\u{200d}日");
    }

    #[test]
    fn every_format_character_is_caught() {
        // Each of these is category Cf.
        for c in [
            '\u{600}',
            '\u{6DD}',
            '\u{70F}',
            '\u{180E}',
            '\u{FFF9}',
            '\u{110BD}',
            '\u{13430}',
            '\u{1BCA0}',
            '\u{1D173}',
            '\u{E0001}',
        ] {
            assert!(is_unsafe(c), "{c:?}");
        }
        // And these (letters, marks, symbols) are not.
        for c in ['a', 'ą', 'ب', 'א', '\u{301}', '\u{FE0F}', '😀', '€'] {
            assert!(!is_unsafe(c), "{c:?}");
        }
    }

    #[test]
    fn cuts_never_split_an_escape() {
        assert_eq!(line_max("hello", 5), "hello");
        assert_eq!(line_max("hello!", 5), "hell…");
        assert_eq!(
            line_max("ab\x1bcd", 4),
            "ab…",
            "the 6-character escape does not fit"
        );
        assert_eq!(line_max("ab\x1bcd", 9), "ab\\u{1b}…");
        assert_eq!(line_max("ab\x1bcd", 10), "ab\\u{1b}cd");
        assert_eq!(line_max("żółćęą", 3), "żó…");
        assert_eq!(line_max("ab", 1), "…");
        assert_eq!(line_max("", 3), "");
    }

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            markup("a <b>bold</b> & c"),
            "a &lt;b&gt;bold&lt;/b&gt; &amp; c"
        );
        assert_eq!(markup("plain"), "plain");
    }
}
