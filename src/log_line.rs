//! One event, one line: the text log escapes line breaks (and, where it writes no colours
//! of its own, other control characters) inside an event, so a value a peer sent cannot
//! start a line of its own that reads as the server's (a red-team finding: dicom-rs warns
//! of an unsupported Specific Character Set with the sender's value as it came, newlines
//! included, and a C-STORE wrote lines like `INFO nightingale: …` into the log). The JSON
//! format escapes ASCII controls itself; what is left (DEL, C1 controls, U+2028/U+2029) is
//! escaped here as JSON escapes (`\uXXXX`), valid in a JSON string and readable in text.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Writes each event (one `write` of the formatted line) with its inner line breaks
/// escaped as `\n`/`\r`, and control characters other than tab as `\u00NN` (escape too,
/// unless the formatter colours the line itself), and in UTF-8 the C1 controls (NEL, U+0085,
/// among them) and the line and paragraph separators U+2028/U+2029 as `\uNNNN`: readers
/// that split lines by Unicode's rules (Python's `splitlines`) saw a forged line there (a
/// re-attack's finding).
pub struct OneLine<W> {
    inner: W,
    colours: bool,
}

impl<W: Write> OneLine<W> {
    pub fn new(inner: W, colours: bool) -> Self {
        OneLine { inner, colours }
    }

    fn escaped(&self, b: u8) -> bool {
        match b {
            b'\t' => false,
            0x1b => !self.colours,
            b => b < 0x20 || b == 0x7f,
        }
    }
}

/// The code point of a Unicode line break, C1 control or bidirectional formatting character
/// (which reorders what a terminal shows: U+202E passed through, a red-team finding)
/// starting `bytes` (UTF-8), and its length.
fn unicode_break(bytes: &[u8]) -> Option<(u32, usize)> {
    match bytes {
        [0xC2, b @ 0x80..=0x9F, ..] => Some((u32::from(*b), 2)),
        [0xD8, 0x9C, ..] => Some((0x061C, 2)),
        [0xE2, 0x80, b @ (0x8E | 0x8F | 0xA8..=0xAE), ..] => {
            Some((0x2000 + u32::from(*b & 0x3F), 3))
        }
        [0xE2, 0x81, b @ 0xA6..=0xA9, ..] => Some((0x2040 + u32::from(*b & 0x3F), 3)),
        _ => None,
    }
}

/// `text` for a terminal: control characters (tab apart), C1 controls, line separators and
/// bidirectional formatting characters written as `\uXXXX` (the CLI prints what bundles
/// name: a file name of `\r\x1b[2Kok ...` printed a forged `ok` line over a `FAIL`, a
/// red-team finding).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let odd = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(
                c,
                '\u{061C}'
                    | '\u{200E}'
                    | '\u{200F}'
                    | '\u{2028}'..='\u{202E}'
                    | '\u{2066}'..='\u{2069}'
            )
    };
    if !text.chars().any(odd) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if odd(c) {
                format!("\\u{:04x}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let plain = |i: usize| !self.escaped(body[i]) && unicode_break(&body[i..]).is_none();
        if (0..body.len()).all(plain) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        let mut i = 0;
        while i < body.len() {
            if let Some((c, len)) = unicode_break(&body[i..]) {
                out.extend_from_slice(format!("\\u{c:04x}").as_bytes());
                i += len;
                continue;
            }
            match body[i] {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b if self.escaped(b) => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                b => out.push(b),
            }
            i += 1;
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Standard error, one line an event ([`OneLine`]).
pub struct OneLineStderr {
    pub colours: bool,
}

impl<'a> MakeWriter<'a> for OneLineStderr {
    type Writer = OneLine<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLine::new(io::stderr(), self.colours)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(colours: bool, line: &[u8]) -> Vec<u8> {
        let mut w = OneLine::new(Vec::new(), colours);
        w.write_all(line).unwrap();
        w.inner
    }

    /// Bidirectional formatting characters (U+202E reorders what a terminal shows) are
    /// escaped in the log and in what the CLI prints, with controls and line separators.
    #[test]
    fn bidi_and_control_characters_are_escaped() {
        let out =
            String::from_utf8(through(false, "a\u{202e}b\u{2066}c\u{200f}d\n".as_bytes())).unwrap();
        assert_eq!(out, "a\\u202eb\\u2066c\\u200fd\n");
        assert_eq!(
            printable("x\r\u{1b}[2Kok\u{202e}\u{85}\ty"),
            "x\\u000d\\u001b[2Kok\\u202e\\u0085\ty"
        );
        assert!(matches!(
            printable("plain é"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn an_event_stays_one_line() {
        let forged = b"WARN dicom_parser: Unsupported character set `X\n2026-12-06T14:00:00Z  INFO nightingale: FORGED\r`, ignoring\n";
        assert_eq!(
            through(false, forged),
            b"WARN dicom_parser: Unsupported character set `X\\n2026-12-06T14:00:00Z  INFO nightingale: FORGED\\r`, ignoring\n"
        );
        // a plain line is written as it is; tabs and UTF-8 are kept
        let plain = "INFO nightingale: listening\taddr=127.0.0.1:8000 é\n".as_bytes();
        assert_eq!(through(false, plain), plain);
        // escape and other controls: escaped, unless the formatter colours the line
        assert_eq!(
            through(false, b"a\x1b[31mb\x07\n"),
            b"a\\u001b[31mb\\u0007\n"
        );
        assert_eq!(through(true, b"a\x1b[31mb\x07\n"), b"a\x1b[31mb\\u0007\n");
        // no final newline: none added
        assert_eq!(through(false, b"x\ny"), b"x\\ny");
        // Unicode's line breaks and C1 controls (NEL), by their code points; other
        // characters of those lead bytes are kept
        assert_eq!(
            through(
                true,
                "a\u{2028}b\u{2029}c\u{85}d\u{9f}e\u{a0}f\u{2027}g\n".as_bytes()
            ),
            "a\\u2028b\\u2029c\\u0085d\\u009fe\u{a0}f\u{2027}g\n".as_bytes()
        );
        let out =
            String::from_utf8(through(false, "x\u{2028}2026 INFO forged\n".as_bytes())).unwrap();
        assert_eq!(out.lines().count(), 1);
        assert!(!out.trim_end().contains(['\u{2028}', '\u{85}']));
    }

    /// The JSON format's lines stay valid JSON with the same values: what is escaped here
    /// is written as JSON's own escapes (`\x7f` was not one: a line with a DEL, a NEL or a
    /// U+2028 in a value would not have parsed).
    #[test]
    fn a_json_line_stays_json_with_its_values() {
        let value = "a\u{7f}b\u{85}c\u{2028}d\te\nf\u{1b}g";
        let line = format!("{}\n", serde_json::json!({"fields": {"detail": value}}));
        for colours in [false, true] {
            let out = String::from_utf8(through(colours, line.as_bytes())).unwrap();
            assert_eq!(out.lines().count(), 1, "{out}");
            let back: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
            assert_eq!(back["fields"]["detail"], value, "{out}");
        }
    }
}
