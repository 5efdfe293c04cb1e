//! What gets shown, and how: mute, do-not-disturb, escaping (terminal-style, then
//! markup), truncation.
//!
//! Settings come from flags and from the shared config file
//! (`~/.config/nes/config.toml`): `notify_mute = ["alice", ...]`, `notify_dnd = true`,
//! `notify_body_max = 200`. The file is read again for every message, so
//! `nes config set notify_dnd true` takes effect at once, without a restart.

use nes_client::settings;
use std::collections::BTreeSet;
use std::path::Path;

/// Longest body shown by default, in characters.
pub const DEFAULT_BODY_MAX: usize = 200;

/// The effective policy for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Users whose messages show no notification (lower-case).
    pub mute: BTreeSet<String>,
    /// Do not disturb: no notifications at all.
    pub dnd: bool,
    /// Longest body, in characters.
    pub body_max: usize,
}

impl Policy {
    /// The flags' policy merged with the config file's: a user muted in either is muted,
    /// DND in either is on, the flag's body length wins over the file's.
    pub fn merge(flags: &Policy, flag_body_max: Option<usize>, file: &FileSettings) -> Policy {
        let mut mute = flags.mute.clone();
        mute.extend(file.mute.iter().map(|u| u.trim().to_lowercase()));
        Policy {
            mute,
            dnd: flags.dnd || file.dnd,
            body_max: flag_body_max
                .or(file.body_max)
                .unwrap_or(DEFAULT_BODY_MAX)
                .max(1),
        }
    }

    /// Whether a message from `from` is shown.
    pub fn shows(&self, from: &str) -> bool {
        !self.dnd && !self.mute.contains(&from.to_lowercase())
    }
}

/// The notify settings of the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    /// `notify_mute`
    pub mute: Vec<String>,
    /// `notify_dnd`
    pub dnd: bool,
    /// `notify_body_max`
    pub body_max: Option<usize>,
}

impl FileSettings {
    /// Reads them from `path`; a missing or broken file means no settings (a broken file
    /// is reported by `nes config` and nesd, not here on every message).
    pub fn read(path: &Path) -> FileSettings {
        let Ok(text) = std::fs::read_to_string(path) else {
            return FileSettings::default();
        };
        let Ok(table) = text.parse::<toml::Table>() else {
            return FileSettings::default();
        };
        let mute = match table.get(settings::NOTIFY_MUTE) {
            Some(toml::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            Some(toml::Value::String(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        };
        FileSettings {
            mute,
            dnd: table
                .get(settings::NOTIFY_DND)
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            body_max: table
                .get(settings::NOTIFY_BODY_MAX)
                .and_then(|v| v.as_integer())
                .and_then(|n| usize::try_from(n).ok()),
        }
    }
}

/// The body shown for a message's `text`: one line with controls, bidi and invisible
/// characters escaped (`nes_client::display::line`), cut to at most `max` characters
/// (the cut marked with `…`, never inside an escape). Markup escaping comes after
/// ([`escape_markup`]), so the cut cannot split an entity either.
pub fn body(text: &str, max: usize) -> String {
    nes_client::display::line_max(text, max)
}

/// Escapes the characters the notification body markup gives meaning to (for servers
/// that announce `body-markup`), so a message is shown as written.
pub fn escape_markup(text: &str) -> String {
    nes_client::display::markup(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(mute: &[&str], dnd: bool) -> Policy {
        Policy {
            mute: mute.iter().map(|s| s.to_string()).collect(),
            dnd,
            body_max: DEFAULT_BODY_MAX,
        }
    }

    #[test]
    fn mute_and_dnd() {
        let p = Policy::merge(
            &flags(&["carol"], false),
            None,
            &FileSettings {
                mute: vec!["Dave".into()],
                ..Default::default()
            },
        );
        assert!(p.shows("alice"));
        assert!(!p.shows("carol"));
        assert!(!p.shows("dave"), "config mutes are case-insensitive");
        assert!(!p.shows("DAVE"));
        let p = Policy::merge(
            &flags(&[], false),
            None,
            &FileSettings {
                dnd: true,
                ..Default::default()
            },
        );
        assert!(!p.shows("alice"));
        let p = Policy::merge(&flags(&[], true), None, &FileSettings::default());
        assert!(!p.shows("alice"));
    }

    #[test]
    fn body_length_precedence() {
        let file = FileSettings {
            body_max: Some(50),
            ..Default::default()
        };
        assert_eq!(
            Policy::merge(&flags(&[], false), Some(10), &file).body_max,
            10
        );
        assert_eq!(Policy::merge(&flags(&[], false), None, &file).body_max, 50);
        assert_eq!(
            Policy::merge(&flags(&[], false), None, &FileSettings::default()).body_max,
            DEFAULT_BODY_MAX
        );
        assert_eq!(
            Policy::merge(&flags(&[], false), Some(0), &file).body_max,
            1
        );
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(body("hello", 5), "hello");
        assert_eq!(body("hello!", 5), "hell…");
        assert_eq!(body("żółćęą", 3), "żó…");
        assert_eq!(body("", 3), "");
        assert_eq!(body("ab", 1), "…");
    }

    #[test]
    fn bodies_are_one_escaped_line() {
        assert_eq!(
            body("hi\nmallory: fake\x1b[2J\u{202e}", 200),
            "hi\\nmallory: fake\\u{1b}[2J\\u{202e}"
        );
        assert_eq!(body("ab\x07cd", 5), "ab…", "an escape is not cut in half");
    }

    #[test]
    fn markup_is_escaped_after_the_cut() {
        assert_eq!(escape_markup("a <b> & c"), "a &lt;b&gt; &amp; c");
        // Cut first, then escaped: no half entity.
        assert_eq!(escape_markup(&body("<b>&&&&", 4)), "&lt;b&gt;…");
    }

    #[test]
    fn settings_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(FileSettings::read(&path), FileSettings::default());
        std::fs::write(&path, "user = \"bob\"\nnotify_mute = [\"alice\", \"carol\"]\nnotify_dnd = true\nnotify_body_max = 40\n").unwrap();
        let s = FileSettings::read(&path);
        assert_eq!(s.mute, vec!["alice", "carol"]);
        assert!(s.dnd);
        assert_eq!(s.body_max, Some(40));
        std::fs::write(&path, "notify_mute = \"alice, bob\"\n").unwrap();
        assert_eq!(FileSettings::read(&path).mute, vec!["alice", "bob"]);
        std::fs::write(&path, "broken = ").unwrap();
        assert_eq!(FileSettings::read(&path), FileSettings::default());
    }
}
