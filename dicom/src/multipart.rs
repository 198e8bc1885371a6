//! A streaming parser of `multipart/related` bodies (RFC 2387, RFC 2046 §5.1), as STOW-RS
//! sends them (PS3.18 §8.6.1.2).
//!
//! Bytes are pushed in as they arrive ([`Parser::feed`]); each part comes out whole once its
//! closing delimiter has been seen, so the parser holds at most one part (bounded by
//! [`Limits::max_part_bytes`]) plus a delimiter's worth of look-ahead. [`Parser::finish`]
//! says whether the body ended at its close delimiter: a body that ends early is an error,
//! whatever parts came out before.
//!
//! Hand-written rather than `multer`: multer is built for `multipart/form-data` (its
//! `parse_boundary` refuses any other subtype, its fields are keyed by Content-Disposition),
//! and the scanner STOW-RS needs is this small file, fuzzed by the tests.

/// Bounds on what one body may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest part body, in bytes.
    pub max_part_bytes: u64,
    /// Largest header block of one part, in bytes.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_part_bytes: 2 << 30,
            max_header_bytes: 16 << 10,
        }
    }
}

/// Why a body (or its Content-Type) is not a usable multipart body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("the media type is {0:?}, not multipart/related")]
    NotMultipartRelated(String),
    #[error("multipart/related with type={0:?}: only application/dicom is accepted")]
    UnsupportedType(String),
    #[error("the Content-Type has no boundary parameter")]
    MissingBoundary,
    #[error("the boundary parameter is not 1 to 200 valid characters (RFC 2046's, 70 in the RFC)")]
    InvalidBoundary,
    #[error("a part is larger than the limit of {limit} bytes")]
    PartTooLarge { limit: u64 },
    #[error("the headers of part {part} are larger than the limit of {limit} bytes")]
    HeadersTooLarge { part: usize, limit: usize },
    #[error("the headers of part {part} are malformed")]
    MalformedHeaders { part: usize },
    #[error("malformed delimiter line after part {part}")]
    MalformedDelimiter { part: usize },
    #[error("the body has no boundary delimiter")]
    NoDelimiter,
    #[error("the body ends before its close delimiter (inside part {part})")]
    Truncated { part: usize },
}

/// The media type of a STOW-RS request, from its Content-Type header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelatedType {
    pub boundary: String,
    /// The `type` parameter (the root part's media type), lower case; `None` when absent.
    pub root_type: Option<String>,
}

/// Parses `multipart/related; type="application/dicom"; boundary=...`. An absent `type` is
/// accepted (every part's own Content-Type is checked anyway); another type is refused.
pub fn parse_content_type(value: &str) -> Result<RelatedType, MultipartError> {
    let mut params = split_params(value);
    let essence = params
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence != "multipart/related" {
        return Err(MultipartError::NotMultipartRelated(essence));
    }
    let mut boundary = None;
    let mut root_type = None;
    for p in params {
        let Some((name, v)) = p.split_once('=') else {
            continue;
        };
        let v = unquote(v.trim());
        match name.trim().to_ascii_lowercase().as_str() {
            "boundary" => boundary = Some(v),
            "type" => root_type = Some(v.to_ascii_lowercase()),
            _ => {}
        }
    }
    if let Some(t) = &root_type
        && t != "application/dicom"
    {
        return Err(MultipartError::UnsupportedType(t.clone()));
    }
    let boundary = boundary.ok_or(MultipartError::MissingBoundary)?;
    if !valid_boundary(&boundary) {
        return Err(MultipartError::InvalidBoundary);
    }
    Ok(RelatedType {
        boundary,
        root_type,
    })
}

/// Splits a header value at `;` outside double quotes.
fn split_params(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        let mut escaped = false;
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ';' if !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if !escaped && c == '\\' {
                    escaped = true;
                    continue;
                }
                escaped = false;
                out.push(c);
            }
            out
        }
        None => v.to_owned(),
    }
}

/// The longest boundary taken. RFC 2046 allows 70 characters, but real clients send more:
/// Orthanc's DICOMweb plugin (1.7) makes its boundary of two UUIDs, 73 characters.
pub const MAX_BOUNDARY_LEN: usize = 200;

/// RFC 2046 bchars: digits, letters and `'()+_,-./:=? ` (not ending in a space), 1 to
/// [`MAX_BOUNDARY_LEN`] of them.
fn valid_boundary(b: &str) -> bool {
    (1..=MAX_BOUNDARY_LEN).contains(&b.len())
        && !b.ends_with(' ')
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c))
}

/// One part of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The part's Content-Type as sent (`None`: the part had none).
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Part {
    /// The media type of the part, lower case, without parameters.
    pub fn media_type(&self) -> Option<String> {
        let ct = self.content_type.as_deref()?;
        split_params(ct)
            .next()
            .map(|e| e.trim().to_ascii_lowercase())
    }

    /// The `transfer-syntax` parameter of the part's Content-Type, if any.
    pub fn transfer_syntax_param(&self) -> Option<String> {
        let ct = self.content_type.as_deref()?;
        split_params(ct).skip(1).find_map(|p| {
            let (n, v) = p.split_once('=')?;
            (n.trim().eq_ignore_ascii_case("transfer-syntax")).then(|| unquote(v.trim()))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (the preamble is skipped).
    Preamble,
    /// Right after a delimiter: `--` (close) or transport padding and CRLF.
    AfterDelimiter,
    Headers,
    Body,
    /// After the close delimiter (the epilogue is ignored).
    End,
}

/// The streaming parser (see the module documentation).
pub struct Parser {
    /// `CRLF--boundary`.
    delimiter: Vec<u8>,
    finder: memchr::memmem::Finder<'static>,
    limits: Limits,
    state: State,
    /// Bytes received and not yet consumed.
    buf: Vec<u8>,
    content_type: Option<String>,
    body: Vec<u8>,
    /// Parts begun so far.
    parts: usize,
}

impl Parser {
    pub fn new(boundary: &str, limits: Limits) -> Parser {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Parser {
            finder: memchr::memmem::Finder::new(&delimiter).into_owned(),
            delimiter,
            limits,
            state: State::Preamble,
            // The first delimiter may open the body without a CRLF before it.
            buf: b"\r\n".to_vec(),
            content_type: None,
            body: Vec::new(),
            parts: 0,
        }
    }

    /// Parts begun so far (the one being read included).
    pub fn parts_seen(&self) -> usize {
        self.parts
    }

    /// Bytes the parser holds: the unparsed input and the body of the part being read.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.body.len()
    }

    /// Pushes the next bytes of the body; returns the parts completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Part>, MultipartError> {
        if self.state == State::End {
            return Ok(vec![]);
        }
        self.buf.extend_from_slice(chunk);
        let mut done = vec![];
        loop {
            match self.state {
                State::Preamble => match self.finder.find(&self.buf) {
                    Some(at) => {
                        self.buf.drain(..at + self.delimiter.len());
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        let keep = self.delimiter.len() - 1;
                        if self.buf.len() > keep {
                            self.buf.drain(..self.buf.len() - keep);
                        }
                        return Ok(done);
                    }
                },
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return Ok(done);
                    }
                    if self.buf.starts_with(b"--") {
                        self.state = State::End;
                        self.buf = Vec::new();
                        return Ok(done);
                    }
                    // Transport padding (spaces, tabs), then CRLF.
                    let pad = self
                        .buf
                        .iter()
                        .take_while(|b| **b == b' ' || **b == b'\t')
                        .count();
                    if pad > 1024 {
                        return Err(MultipartError::MalformedDelimiter { part: self.parts });
                    }
                    if self.buf.len() < pad + 2 {
                        return Ok(done);
                    }
                    if &self.buf[pad..pad + 2] != b"\r\n" {
                        return Err(MultipartError::MalformedDelimiter { part: self.parts });
                    }
                    // Keep the CRLF: the header block search below finds CRLFCRLF, or a
                    // lone CRLF when the part has no headers.
                    self.buf.drain(..pad);
                    self.parts += 1;
                    self.state = State::Headers;
                }
                State::Headers => {
                    let limit = self.limits.max_header_bytes;
                    let Some(end) = memchr::memmem::find(&self.buf, b"\r\n\r\n") else {
                        if self.buf.len() > limit + 4 {
                            return Err(MultipartError::HeadersTooLarge {
                                part: self.parts,
                                limit,
                            });
                        }
                        return Ok(done);
                    };
                    if end > limit + 2 {
                        return Err(MultipartError::HeadersTooLarge {
                            part: self.parts,
                            limit,
                        });
                    }
                    // buf = CRLF headers CRLF CRLF body...; with no headers: CRLF CRLF body.
                    let block = &self.buf[2.min(end)..end];
                    self.content_type = parse_headers(block, self.parts)?;
                    self.buf.drain(..end + 4);
                    self.body = Vec::new();
                    self.state = State::Body;
                }
                State::Body => {
                    let found = self.finder.find(&self.buf);
                    let take = match found {
                        Some(at) => at,
                        None => self.buf.len().saturating_sub(self.delimiter.len() - 1),
                    };
                    if (self.body.len() + take) as u64 > self.limits.max_part_bytes {
                        return Err(MultipartError::PartTooLarge {
                            limit: self.limits.max_part_bytes,
                        });
                    }
                    self.body.extend_from_slice(&self.buf[..take]);
                    match found {
                        Some(at) => {
                            self.buf.drain(..at + self.delimiter.len());
                            done.push(Part {
                                content_type: self.content_type.take(),
                                body: std::mem::take(&mut self.body),
                            });
                            self.state = State::AfterDelimiter;
                        }
                        None => {
                            self.buf.drain(..take);
                            return Ok(done);
                        }
                    }
                }
                State::End => return Ok(done),
            }
        }
    }

    /// Ends the body: an error unless the close delimiter was seen.
    pub fn finish(self) -> Result<(), MultipartError> {
        match self.state {
            State::End => Ok(()),
            State::Preamble => Err(MultipartError::NoDelimiter),
            _ => Err(MultipartError::Truncated { part: self.parts }),
        }
    }
}

/// The Content-Type of a part's header block (`Name: value` lines separated by CRLF).
fn parse_headers(block: &[u8], part: usize) -> Result<Option<String>, MultipartError> {
    let malformed = || MultipartError::MalformedHeaders { part };
    let mut content_type = None;
    if block.is_empty() {
        return Ok(None);
    }
    let text = std::str::from_utf8(block).map_err(|_| malformed())?;
    for line in text.split("\r\n") {
        if line.contains(['\r', '\n']) {
            return Err(malformed());
        }
        let (name, value) = line.split_once(':').ok_or_else(malformed)?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(malformed());
        }
        if name.eq_ignore_ascii_case("content-type") {
            if content_type.is_some() {
                return Err(malformed());
            }
            content_type = Some(value.trim().to_owned());
        }
    }
    Ok(content_type)
}
