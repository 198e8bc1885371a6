//! The STOW-RS multipart parser: bodies built here (RFC 2046 framing) come back as their
//! parts whatever the chunking; cut, mutated and arbitrary bodies never panic and never yield
//! a part the body did not hold whole. A bounded proptest corpus.

use nightingale_dicom::multipart::{
    Limits, MultipartError, Parser, Part, RelatedType, parse_content_type,
};
use proptest::prelude::*;

mod support;

const BOUNDARY: &str = "x-b0und4ry";

fn body(parts: &[(Option<&str>, &[u8])], preamble: &[u8], crlf_first: bool) -> Vec<u8> {
    let mut b = preamble.to_vec();
    if crlf_first {
        b.extend_from_slice(b"\r\n");
    }
    for (ct, bytes) in parts {
        b.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        if let Some(ct) = ct {
            b.extend_from_slice(format!("Content-Type: {ct}\r\nX-Other: 1\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(bytes);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\nepilogue").as_bytes());
    b
}

/// Feeds `body` in chunks of the given sizes (cycled); the parts, and the final verdict.
fn parse(body: &[u8], chunks: &[usize], limits: Limits) -> (Vec<Part>, Result<(), MultipartError>) {
    let mut parser = Parser::new(BOUNDARY, limits);
    let mut parts = vec![];
    let mut at = 0;
    let mut i = 0;
    while at < body.len() {
        let n = chunks[i % chunks.len()].max(1).min(body.len() - at);
        i += 1;
        match parser.feed(&body[at..at + n]) {
            Ok(more) => parts.extend(more),
            Err(e) => return (parts, Err(e)),
        }
        at += n;
    }
    (parts, parser.finish())
}

#[test]
fn content_types() {
    assert_eq!(
        parse_content_type("multipart/related; type=\"application/dicom\"; boundary=\"a b:c=d\""),
        Ok(RelatedType {
            boundary: "a b:c=d".into(),
            root_type: Some("application/dicom".into())
        })
    );
    assert_eq!(
        parse_content_type("Multipart/Related;boundary=abc")
            .unwrap()
            .boundary,
        "abc"
    );
    assert_eq!(
        parse_content_type("multipart/form-data; boundary=abc"),
        Err(MultipartError::NotMultipartRelated(
            "multipart/form-data".into()
        ))
    );
    assert_eq!(
        parse_content_type("multipart/related; type=application/dicom+xml; boundary=abc"),
        Err(MultipartError::UnsupportedType(
            "application/dicom+xml".into()
        ))
    );
    assert_eq!(
        parse_content_type("multipart/related; type=\"application/dicom\""),
        Err(MultipartError::MissingBoundary)
    );
    // `;` is not a boundary character (RFC 2046), quoted or not.
    assert_eq!(
        parse_content_type("multipart/related; boundary=\"a;b\""),
        Err(MultipartError::InvalidBoundary)
    );
    // Longer than RFC 2046's 70, as Orthanc's DICOMweb plugin sends (two UUIDs): taken, up
    // to a bound.
    let orthanc = "4d9c7270-b4d5-46c3-95f7-0feebdc9be9f-4d9c7270-b4d5-46c3-95f7-0feebdc9be9f";
    assert_eq!(
        parse_content_type(&format!(
            "multipart/related; type=\"application/dicom\"; boundary={orthanc}"
        ))
        .unwrap()
        .boundary,
        orthanc
    );
    assert_eq!(
        parse_content_type(&format!(
            "multipart/related; boundary={}",
            "a".repeat(nightingale_dicom::multipart::MAX_BOUNDARY_LEN + 1)
        )),
        Err(MultipartError::InvalidBoundary)
    );
}

#[test]
fn a_part_without_headers_has_no_content_type_and_a_part_too_large_is_refused() {
    let b = body(&[(None, b"abc")], b"", false);
    let (parts, end) = parse(&b, &[7], Limits::default());
    assert_eq!(end, Ok(()));
    assert_eq!(
        parts,
        vec![Part {
            content_type: None,
            body: b"abc".to_vec()
        }]
    );
    let b = body(&[(Some("application/dicom"), &[1u8; 100])], b"", true);
    let (_, end) = parse(
        &b,
        &[3],
        Limits {
            max_part_bytes: 99,
            ..Limits::default()
        },
    );
    assert_eq!(end, Err(MultipartError::PartTooLarge { limit: 99 }));
}

fn part_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Bytes that include CR, LF and dashes often, so that near-delimiters occur.
    proptest::collection::vec(
        prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), any::<u8>()],
        0..300,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn valid_bodies_give_their_parts_whatever_the_chunking(
        bodies in proptest::collection::vec(part_bytes(), 1..5),
        chunks in proptest::collection::vec(1usize..64, 1..8),
        preamble in proptest::collection::vec(any::<u8>().prop_filter("no CR", |b| *b != b'\r'), 0..40),
        crlf_first in any::<bool>(),
    ) {
        // A body may not contain its delimiter (RFC 2046): such cases are not valid bodies.
        let delimiter = format!("\r\n--{BOUNDARY}");
        prop_assume!(bodies.iter().all(|b| !b.windows(delimiter.len()).any(|w| w == delimiter.as_bytes())
            && !b.starts_with(&delimiter.as_bytes()[2..])));
        let parts: Vec<(Option<&str>, &[u8])> =
            bodies.iter().map(|b| (Some("application/dicom"), b.as_slice())).collect();
        let preamble = if crlf_first { preamble } else { vec![] };
        let b = body(&parts, &preamble, crlf_first);
        let (got, end) = parse(&b, &chunks, Limits::default());
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(got.len(), bodies.len());
        for (g, want) in got.iter().zip(&bodies) {
            prop_assert_eq!(&g.body, want);
            prop_assert_eq!(g.media_type(), Some("application/dicom".to_owned()));
        }
    }

    /// A cut body is never complete, and every part that came out is one of the originals.
    #[test]
    fn cut_bodies_end_in_an_error(
        bodies in proptest::collection::vec(part_bytes(), 1..4),
        cut in any::<prop::sample::Index>(),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let delimiter = format!("\r\n--{BOUNDARY}");
        prop_assume!(bodies.iter().all(|b| !b.windows(delimiter.len()).any(|w| w == delimiter.as_bytes())));
        let parts: Vec<(Option<&str>, &[u8])> =
            bodies.iter().map(|b| (Some("application/dicom"), b.as_slice())).collect();
        let b = body(&parts, b"", false);
        // Anything shorter than the close delimiter's dashes is cut.
        let close = b.len() - b"--\r\nepilogue".len();
        let at = cut.index(close);
        let (got, end) = parse(&b[..at], &chunks, Limits::default());
        prop_assert!(end.is_err());
        for (g, want) in got.iter().zip(&bodies) {
            prop_assert_eq!(&g.body, want);
        }
    }

    /// Arbitrary bytes and mutated bodies: no panic, and parts are bounded by the limit.
    #[test]
    fn arbitrary_and_mutated_bodies_never_panic(
        junk in proptest::collection::vec(any::<u8>(), 0..600),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let limits = Limits { max_part_bytes: 256, max_header_bytes: 64 };
        let (got, _) = parse(&junk, &chunks, limits);
        prop_assert!(got.iter().all(|p| p.body.len() <= 256));
        let mut b = body(&[(Some("application/dicom"), &[7u8; 200]), (Some("text/plain"), b"x")], b"", false);
        for (i, x) in flips {
            let i = i.index(b.len());
            b[i] ^= x;
        }
        let (got, _) = parse(&b, &chunks, limits);
        prop_assert!(got.len() <= 2);
        prop_assert!(got.iter().all(|p| p.body.len() <= 256));
    }
}

#[test]
fn the_parts_of_a_request_are_staged_in_one_file_and_read_back_equal() {
    use nightingale_dicom::stow::Staging;
    let (spool, _dir) = support::temp_spool();
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let staging = Staging::new(&spool).unwrap();
    let before = open_fds();
    // As many parts as a hostile body of tiny parts would send: one descriptor for all
    // (other tests of this binary may open a few files meanwhile; 2,000 would show).
    let staged: Vec<_> = (0..2000u32)
        .map(|i| {
            staging
                .stage(Part {
                    content_type: Some(format!("application/dicom; n={i}")),
                    body: i.to_le_bytes().repeat(1 + (i as usize % 7)),
                })
                .unwrap()
        })
        .collect();
    assert!(open_fds() < before + 50, "{} -> {}", before, open_fds());
    drop(staging);
    for (i, part) in staged.into_iter().enumerate().rev() {
        let i = i as u32;
        let part = part.load().unwrap();
        assert_eq!(part.body, i.to_le_bytes().repeat(1 + (i as usize % 7)));
        assert_eq!(
            part.content_type.unwrap(),
            format!("application/dicom; n={i}")
        );
    }
}
