//! One event, one line: the text log escapes line breaks (and, where it writes no colours
//! of its own, other control characters) inside an event, so a value a peer sent cannot
//! start a line of its own that reads as the server's (a red-team finding: dicom-rs warns
//! of an unsupported Specific Character Set with the sender's value as it came, newlines
//! included, and a C-STORE wrote lines like `INFO nightingale: …` into the log). The JSON
//! format escapes them already.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Writes each event (one `write` of the formatted line) with its inner line breaks
/// escaped as `\n`/`\r`, and control characters other than tab as `\xNN` (escape too,
/// unless the formatter colours the line itself).
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

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.iter().any(|&b| self.escaped(b)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b if self.escaped(b) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                b => out.push(b),
            }
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
        assert_eq!(through(false, b"a\x1b[31mb\x07\n"), b"a\\x1b[31mb\\x07\n");
        assert_eq!(through(true, b"a\x1b[31mb\x07\n"), b"a\x1b[31mb\\x07\n");
        // no final newline: none added
        assert_eq!(through(false, b"x\ny"), b"x\\ny");
    }
}
