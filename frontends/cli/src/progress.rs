//! Progress bars on stderr for file transfers (indicatif).
//!
//! A bar is drawn only when stderr is a terminal: a script that captures stderr (or a
//! log) must see nothing but real messages there, never bar redraws.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A bar of `len` bytes (a spinner with a byte count when the length is not known, as
/// for stdin), labelled `what`; hidden when stderr is not a terminal.
pub fn bytes(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(bar_style()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            .with_style(spinner_style()),
    };
    bar.set_message(nes_client::display::line_max(what, 40));
    bar
}

/// A bar of known length: name, bar, bytes of total, percent, speed, time left.
const BAR: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {percent}% {bytes_per_sec} {eta}";
/// Of unknown length: a spinner, name, bytes so far, speed.
const SPINNER: &str = "{spinner} {msg} {bytes} {bytes_per_sec}";

fn bar_style() -> ProgressStyle {
    // The template is a constant (tested below); were it to fail, a plain bar is drawn.
    ProgressStyle::with_template(BAR)
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template(SPINNER).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse() {
        assert!(ProgressStyle::with_template(BAR).is_ok());
        assert!(ProgressStyle::with_template(SPINNER).is_ok());
        // Under `cargo test` stderr is usually captured: no bar is drawn then.
        let bar = bytes(Some(10), "x");
        bar.inc(5);
        bar.finish_and_clear();
    }
}
