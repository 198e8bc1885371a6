//! What decoding a `ModelInferRequest` will allocate, read from its wire bytes before prost
//! decodes it, so that the admission budget (`--max-inflight-bytes`) is charged for it first.
//!
//! A message's size on the wire says little about its decoded size: an empty `inputs` entry
//! is two bytes on the wire and a ~300-byte `InferInputTensor` once decoded (with its place
//! in a vector that grows by doubling), an empty parameter two bytes and a map entry, an empty
//! `bytes_contents` element one byte and a `Vec`. A 64 MiB message of them would take ~10 GB
//! (measured: 8 MiB took 1.25 GB). prost offers no bound or allocation hook, and no crate
//! reads a protobuf message's shape without decoding it, hence this walk over the wire format
//! (protobuf encoding: <https://protobuf.dev/programming-guides/encoding/>): it visits every
//! field of the message's schema, counts what each allocates at its decoded size
//! (`size_of` the generated types, twice for vector and map growth), and skips the fields
//! prost skips (unknown ones). The bound is conservative: it may exceed what prost takes,
//! never fall short of it.

use std::mem::size_of;

use super::grpc::proto::InferParameter;
use super::grpc::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

/// Wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Groups (proto2's, wire types 3 and 4) nested in an unknown field at most this deep: prost
/// skips them to its recursion limit of 100 levels in all, messages included (a message here
/// nests at most 4 deep).
const MAX_GROUP_DEPTH: usize = 64;

/// Vectors and maps grow by doubling: what they hold may be up to twice their contents.
const GROWTH: usize = 2;

/// Fields that decode into nothing, across a message: fields of no known number, and a
/// singular field's occurrences after its first (prost keeps the last). A few are a newer
/// client's, or an odd encoder's; millions of them (two bytes each: a 61 KB gzip message
/// inflated to 60 MB) cost seconds of CPU to decode and are charged nothing (red-team
/// findings: unknown fields, then an `id` repeated 33 million times, and unknown fields
/// inside a parameter).
const MAX_UNKNOWN_FIELDS: usize = 1024;

/// Counts over a whole message that are refused before prost decodes it (their memory is
/// charged, but their decoding's CPU is not): fields that decode into nothing, a map's
/// parameters (as over HTTP, [`super::codec::MAX_PARAMETERS`]), a shape's dimensions
/// ([`super::codec::MAX_DIMS`]).
#[derive(Default)]
struct Counts {
    unknown: usize,
    unpacked: usize,
}

/// Fields of a message that each decode into one element: repeated scalar contents written
/// one field each (not packed, as proto3 encoders write them), strings of `bytes_contents`,
/// entries of `raw_input_contents`, inputs and outputs. Two bytes each on the wire and a few
/// decoded, 30 million of them took seconds to decode (re-attacks' findings: unpacked
/// scalars, then empty strings and empty raw entries).
const MAX_UNPACKED_ELEMENTS: usize = 1 << 20;

impl Counts {
    /// One more field that decodes into nothing.
    fn one_more(&mut self) -> Result<(), String> {
        self.unknown += 1;
        if self.unknown > MAX_UNKNOWN_FIELDS {
            return Err(format!(
                "more than {MAX_UNKNOWN_FIELDS} fields of no known number or repeated singular fields"
            ));
        }
        Ok(())
    }

    /// One more field that decodes into one element ([`MAX_UNPACKED_ELEMENTS`]).
    fn one_unpacked(&mut self) -> Result<(), String> {
        self.unpacked += 1;
        if self.unpacked > MAX_UNPACKED_ELEMENTS {
            return Err(format!(
                "more than {MAX_UNPACKED_ELEMENTS} separately encoded elements (tensor elements not packed, as proto3 packs repeated scalars, strings, raw contents, inputs and outputs)"
            ));
        }
        Ok(())
    }

    /// An unknown field (`field`), skipped as prost skips it: a group (proto2) to its end,
    /// every field inside it counted too (groups were refused, where prost decodes a
    /// message holding one: a re-attack's finding).
    fn unknown(&mut self, r: &mut Reader<'_>, field: u64, wire: u8) -> Result<(), String> {
        self.skip_unknown(r, field, wire, 0)
    }

    fn skip_unknown(
        &mut self,
        r: &mut Reader<'_>,
        field: u64,
        wire: u8,
        depth: usize,
    ) -> Result<(), String> {
        self.one_more()?;
        if wire != START_GROUP {
            return r.skip(wire);
        }
        if depth >= MAX_GROUP_DEPTH {
            return Err(format!("groups nested more than {MAX_GROUP_DEPTH} deep"));
        }
        loop {
            let Some((inner, inner_wire)) = r.key()? else {
                return Err("a group is not closed".to_owned());
            };
            if inner_wire == END_GROUP {
                if inner != field {
                    return Err("a group is closed by another field's end".to_owned());
                }
                return Ok(());
            }
            self.skip_unknown(r, inner, inner_wire, depth + 1)?;
        }
    }

    /// A singular field (of number `field` < 64) met: counted when `seen` holds it already.
    fn singular(&mut self, seen: &mut u64, field: u64) -> Result<(), String> {
        let bit = 1u64 << field;
        if *seen & bit != 0 {
            self.one_more()?;
        }
        *seen |= bit;
        Ok(())
    }
}

/// One more entry of a parameters map that holds `held` already.
fn one_more_parameter(held: &mut usize) -> Result<(), String> {
    *held += 1;
    if *held > super::codec::MAX_PARAMETERS {
        return Err(format!(
            "more than {} parameters in one map",
            super::codec::MAX_PARAMETERS
        ));
    }
    Ok(())
}

/// An upper bound, in bytes, on what prost allocates to decode `message` as a
/// `ModelInferRequest` (beyond `message` itself, which `raw_input_contents` slices); an error
/// when it is not one (prost would refuse it too).
pub(crate) fn infer_request_bound(message: &[u8]) -> Result<usize, String> {
    let mut r = Reader::new(message);
    let mut total = 0usize;
    let mut counts = Counts::default();
    let mut parameters = 0usize;
    let mut seen = 0u64;
    while let Some((field, wire)) = r.key()? {
        let add = match (field, wire) {
            // model_name, model_version, id
            (1..=3, LEN) => {
                counts.singular(&mut seen, field)?;
                r.string()?.len()
            }
            (4, LEN) => {
                one_more_parameter(&mut parameters)?;
                map_entry(r.len_delimited()?, &mut counts)?
            }
            (5, LEN) => {
                counts.one_unpacked()?;
                size_of::<InferInputTensor>() * GROWTH
                    + input_tensor(r.len_delimited()?, &mut counts)?
            }
            (6, LEN) => {
                counts.one_unpacked()?;
                size_of::<InferRequestedOutputTensor>() * GROWTH
                    + requested_output(r.len_delimited()?, &mut counts)?
            }
            // raw_input_contents: `Bytes` slicing the received message.
            (7, LEN) => {
                counts.one_unpacked()?;
                r.len_delimited()?;
                size_of::<bytes::Bytes>() * GROWTH
            }
            (1..=7, _) => return Err(format!("field {field} has the wrong wire type {wire}")),
            _ => {
                counts.unknown(&mut r, field, wire)?;
                0
            }
        };
        total = total.saturating_add(add);
    }
    Ok(total)
}

/// The model name and version (fields 1 and 2) a `ModelInferRequest` names, read from as much
/// of its start as `head` holds (a message refused before it was decoded, or read whole:
/// its audit record names its model as an HTTP request's URL does). `None` for a field not
/// found whole, or not UTF-8, before the first field that cannot be read.
pub(crate) fn model_of(head: &[u8]) -> (Option<String>, Option<String>) {
    let mut r = Reader::new(head);
    let (mut name, mut version) = (None, None);
    // Clients write the fields in number order; a few others first are tolerated.
    for _ in 0..64 {
        let Ok(Some((field, wire))) = r.key() else {
            break;
        };
        let text = |bytes: &[u8]| std::str::from_utf8(bytes).ok().map(str::to_owned);
        match (field, wire) {
            (1, LEN) => match r.len_delimited() {
                Ok(b) => name = text(b),
                Err(_) => break,
            },
            (2, LEN) => match r.len_delimited() {
                Ok(b) => version = text(b),
                Err(_) => break,
            },
            _ => {
                if r.skip(wire).is_err() {
                    break;
                }
            }
        }
        if name.is_some() && version.is_some() {
            break;
        }
    }
    (name, version)
}

/// One `InferInputTensor`'s contents (beyond the struct itself).
fn input_tensor(bytes: &[u8], counts: &mut Counts) -> Result<usize, String> {
    let mut r = Reader::new(bytes);
    let mut total = 0usize;
    let (mut dims, mut parameters) = (0usize, 0usize);
    let mut seen = 0u64;
    let mut more_dims = |n: usize| {
        dims = dims.saturating_add(n);
        if dims > super::codec::MAX_DIMS {
            return Err(format!(
                "an input's shape has more than {} dimensions",
                super::codec::MAX_DIMS
            ));
        }
        Ok(n * size_of::<i64>() * GROWTH)
    };
    while let Some((field, wire)) = r.key()? {
        let add = match (field, wire) {
            // name, datatype
            (1 | 2, LEN) => {
                counts.singular(&mut seen, field)?;
                r.string()?.len()
            }
            // shape: repeated int64, packed (in one piece; more, or empty ones, decode into
            // nothing but CPU: counted) or not.
            (3, LEN) => {
                counts.singular(&mut seen, field)?;
                more_dims(varints(r.len_delimited()?)?)?
            }
            (3, VARINT) => {
                r.varint()?;
                more_dims(1)?
            }
            (4, LEN) => {
                one_more_parameter(&mut parameters)?;
                map_entry(r.len_delimited()?, counts)?
            }
            (5, LEN) => {
                counts.singular(&mut seen, field)?;
                contents(r.len_delimited()?, counts)?
            }
            (1..=5, _) => return Err(format!("input field {field} has the wrong wire type")),
            _ => {
                counts.unknown(&mut r, field, wire)?;
                0
            }
        };
        total = total.saturating_add(add);
    }
    Ok(total)
}

/// One `InferRequestedOutputTensor`'s contents.
fn requested_output(bytes: &[u8], counts: &mut Counts) -> Result<usize, String> {
    let mut r = Reader::new(bytes);
    let mut total = 0usize;
    let mut parameters = 0usize;
    let mut seen = 0u64;
    while let Some((field, wire)) = r.key()? {
        let add = match (field, wire) {
            // name
            (1, LEN) => {
                counts.singular(&mut seen, field)?;
                r.string()?.len()
            }
            (2, LEN) => {
                one_more_parameter(&mut parameters)?;
                map_entry(r.len_delimited()?, counts)?
            }
            (1 | 2, _) => return Err(format!("output field {field} has the wrong wire type")),
            _ => {
                counts.unknown(&mut r, field, wire)?;
                0
            }
        };
        total = total.saturating_add(add);
    }
    Ok(total)
}

/// One entry of a `map<string, InferParameter>`: its slot (twice, for the table's growth and
/// its control byte) and its strings (the key, a string parameter: within the entry's bytes).
/// Its fields are walked as prost decodes them: a key and a value, the value's one choice.
fn map_entry(bytes: &[u8], counts: &mut Counts) -> Result<usize, String> {
    let mut r = Reader::new(bytes);
    let mut seen = 0u64;
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            // the key
            (1, LEN) => {
                counts.singular(&mut seen, field)?;
                r.string()?;
            }
            (2, LEN) => {
                counts.singular(&mut seen, field)?;
                parameter(r.len_delimited()?, counts)?;
            }
            (1 | 2, _) => return Err(format!("parameter field {field} has the wrong wire type")),
            _ => counts.unknown(&mut r, field, wire)?,
        }
    }
    Ok((size_of::<(String, InferParameter)>() + 1) * GROWTH + bytes.len())
}

/// An `InferParameter`: one of five choices, each a singular field (a later one replaces an
/// earlier, and counts as a field that decodes into nothing).
fn parameter(bytes: &[u8], counts: &mut Counts) -> Result<(), String> {
    let mut r = Reader::new(bytes);
    let mut any = false;
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1 | 2 | 5, VARINT) | (4, FIXED64) | (3, LEN) => {
                if any {
                    counts.one_more()?;
                }
                any = true;
                // string_param
                if wire == LEN {
                    r.string()?;
                } else {
                    r.skip(wire)?;
                }
            }
            (1..=5, _) => {
                return Err(format!("parameter choice {field} has the wrong wire type"));
            }
            _ => counts.unknown(&mut r, field, wire)?,
        }
    }
    Ok(())
}

/// An `InferTensorContents`: each repeated field's elements at their decoded size.
fn contents(bytes: &[u8], counts: &mut Counts) -> Result<usize, String> {
    let mut r = Reader::new(bytes);
    let mut total = 0usize;
    // A packed field is written in one piece: more pieces (empty ones cost CPU and are
    // charged nothing: a re-attack's finding) count as fields that decode into nothing.
    let mut pieces = 0u64;
    while let Some((field, wire)) = r.key()? {
        let element = match field {
            1 => size_of::<bool>(),
            2 | 4 | 6 => 4,
            3 | 5 | 7 => 8,
            8 => size_of::<Vec<u8>>(),
            _ => {
                counts.unknown(&mut r, field, wire)?;
                continue;
            }
        };
        let count_and_extra = match (field, wire) {
            (8, LEN) => {
                counts.one_unpacked()?;
                (1, r.len_delimited()?.len())
            }
            // Packed: varints counted; fixed-width elements by their length.
            (1..=5, LEN) => {
                counts.singular(&mut pieces, field)?;
                (varints(r.len_delimited()?)?, 0)
            }
            (6 | 7, LEN) => {
                counts.singular(&mut pieces, field)?;
                let width = if field == 6 { 4 } else { 8 };
                let len = r.len_delimited()?.len();
                if len % width != 0 {
                    return Err(format!(
                        "packed contents field {field} of {len} bytes, not a multiple of {width}"
                    ));
                }
                (len / width, 0)
            }
            // One element not packed.
            (1..=5, VARINT) => {
                counts.one_unpacked()?;
                r.varint()?;
                (1, 0)
            }
            (6, FIXED32) | (7, FIXED64) => {
                counts.one_unpacked()?;
                r.skip(wire)?;
                (1, 0)
            }
            _ => return Err(format!("contents field {field} has the wrong wire type")),
        };
        let (count, extra) = count_and_extra;
        total = total
            .saturating_add(count.saturating_mul(element * GROWTH))
            .saturating_add(extra);
    }
    Ok(total)
}

/// How many varints a packed field's bytes hold, each one read as prost reads it (one cut
/// short, over ten bytes or over 64 bits is refused: prost refused it after this walk had
/// passed it, and the call was answered INTERNAL, unaudited: a red-team finding).
fn varints(bytes: &[u8]) -> Result<usize, String> {
    let mut r = Reader::new(bytes);
    let mut count = 0;
    while !r.bytes.is_empty() {
        r.varint()
            .map_err(|_| "a packed field holds a varint cut short or too long".to_owned())?;
        count += 1;
    }
    Ok(count)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for (i, &b) in self.bytes.iter().enumerate().take(10) {
            // The tenth byte holds bit 63 alone: more overflows, and prost refuses it.
            if i == 9 && b > 1 {
                break;
            }
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Ok(value);
            }
        }
        Err("a varint is cut short or too long".to_owned())
    }

    /// The next field's number and wire type; `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, String> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        // prost refuses a key over 32 bits (it passed here as an unknown field, and prost's
        // refusal inside tonic was answered INTERNAL, unaudited: a re-attack's finding).
        if key > u64::from(u32::MAX) {
            return Err("a field key over 32 bits".to_owned());
        }
        let field = key >> 3;
        if field == 0 {
            return Err("field number 0".to_owned());
        }
        Ok(Some((field, (key & 7) as u8)))
    }

    /// A `string` field: UTF-8, as prost requires (it refused one that is not after this
    /// walk had passed it: answered INTERNAL and unaudited, a red-team finding).
    fn string(&mut self) -> Result<&'a [u8], String> {
        let bytes = self.len_delimited()?;
        std::str::from_utf8(bytes).map_err(|_| "a string field is not UTF-8".to_owned())?;
        Ok(bytes)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], String> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.bytes.len())
            .ok_or("a length runs past the end of the message")?;
        let (field, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(field)
    }

    fn take(&mut self, n: usize) -> Result<(), String> {
        if self.bytes.len() < n {
            return Err("a fixed-width field is cut short".to_owned());
        }
        self.bytes = &self.bytes[n..];
        Ok(())
    }

    /// Skips a field prost does not keep, of any wire type but a group's (which
    /// [`Counts::unknown`] walks) and 6 or 7 (none).
    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8),
            LEN => self.len_delimited().map(drop),
            FIXED32 => self.take(4),
            _ => Err(format!("wire type {wire} is not supported")),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn the_model_is_read_from_the_start_of_a_message() {
        let m = ModelInferRequest {
            model_name: "wdbc-malignancy".into(),
            model_version: "2".into(),
            raw_input_contents: vec![vec![0u8; 100].into()],
            ..Default::default()
        };
        let bytes = m.encode_to_vec();
        assert_eq!(
            model_of(&bytes),
            (Some("wdbc-malignancy".into()), Some("2".into()))
        );
        // Cut after the name: the name alone; cut inside it: nothing.
        assert_eq!(
            model_of(&bytes[..17]),
            (Some("wdbc-malignancy".into()), None)
        );
        assert_eq!(model_of(&bytes[..8]), (None, None));
        assert_eq!(model_of(b"\xff\xff"), (None, None));
    }

    use super::*;
    use crate::http::grpc::proto::{InferTensorContents, ModelInferRequest, infer_parameter};

    fn input(name: &str, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: "FP32".into(),
            shape: vec![1, 30],
            parameters: [(
                "k".to_owned(),
                InferParameter {
                    parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(
                        "v".into(),
                    )),
                },
            )]
            .into(),
            contents,
        }
    }

    /// Heap bytes a decoded request holds, counted from the decoded value (vectors at their
    /// length, without growth): the bound must be at least this.
    fn held(m: &ModelInferRequest) -> usize {
        let params = |p: &std::collections::HashMap<String, InferParameter>| {
            p.len() * size_of::<(String, InferParameter)>()
                + p.keys().map(String::len).sum::<usize>()
        };
        let mut n = m.model_name.len() + m.model_version.len() + m.id.len() + params(&m.parameters);
        for i in &m.inputs {
            n += size_of::<InferInputTensor>() + i.name.len() + i.datatype.len();
            n += i.shape.len() * 8 + params(&i.parameters);
            if let Some(c) = &i.contents {
                n += c.bool_contents.len()
                    + 4 * (c.int_contents.len() + c.uint_contents.len() + c.fp32_contents.len())
                    + 8 * (c.int64_contents.len()
                        + c.uint64_contents.len()
                        + c.fp64_contents.len());
                n += c
                    .bytes_contents
                    .iter()
                    .map(|b| size_of::<Vec<u8>>() + b.len())
                    .sum::<usize>();
            }
        }
        for o in &m.outputs {
            n += size_of::<InferRequestedOutputTensor>() + o.name.len() + params(&o.parameters);
        }
        n + m.raw_input_contents.len() * size_of::<bytes::Bytes>()
    }

    #[test]
    fn the_bound_covers_what_prost_decodes_and_scales_with_what_it_allocates() {
        let typed = InferTensorContents {
            bool_contents: vec![true; 7],
            int_contents: vec![-1, 300, 70_000],
            int64_contents: vec![i64::MIN, 5],
            uint_contents: vec![1, u32::MAX],
            uint64_contents: vec![u64::MAX],
            fp32_contents: vec![0.5; 30],
            fp64_contents: vec![0.25; 3],
            bytes_contents: vec![vec![], b"abc".to_vec(), vec![0; 100]],
        };
        let messages = [
            ModelInferRequest::default(),
            ModelInferRequest {
                model_name: "wdbc-malignancy".into(),
                model_version: "2".into(),
                id: "x".repeat(100),
                inputs: vec![input("features", Some(typed.clone()))],
                ..Default::default()
            },
            ModelInferRequest {
                model_name: "m".into(),
                inputs: vec![input("a", None), input("b", None)],
                outputs: vec![InferRequestedOutputTensor {
                    name: "p".into(),
                    parameters: Default::default(),
                }],
                raw_input_contents: vec![bytes::Bytes::from(vec![0u8; 120]); 2],
                ..Default::default()
            },
            // The amplifying shapes: many empty entries.
            ModelInferRequest {
                inputs: vec![InferInputTensor::default(); 1000],
                ..Default::default()
            },
            ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor::default(); 1000],
                raw_input_contents: vec![bytes::Bytes::new(); 1000],
                ..Default::default()
            },
            ModelInferRequest {
                inputs: vec![input(
                    "x",
                    Some(InferTensorContents {
                        bytes_contents: vec![vec![]; 5000],
                        bool_contents: vec![false; 5000],
                        ..Default::default()
                    }),
                )],
                ..Default::default()
            },
        ];
        for m in &messages {
            let wire = m.encode_to_vec();
            let bound = infer_request_bound(&wire).unwrap();
            let decoded = ModelInferRequest::decode(wire.as_slice()).unwrap();
            assert!(
                bound >= held(&decoded),
                "bound {bound} < held {} for {} wire bytes",
                held(&decoded),
                wire.len()
            );
        }
        // 2 wire bytes per empty input: the bound sees the ~150x.
        let wire = messages[3].encode_to_vec();
        assert_eq!(wire.len(), 2000);
        assert!(infer_request_bound(&wire).unwrap() >= 1000 * size_of::<InferInputTensor>());
    }

    #[test]
    fn floods_of_unknown_fields_parameters_or_dimensions_are_refused() {
        let base = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let with = |extra: &[u8], times: usize| {
            let mut wire = base.clone();
            for _ in 0..times {
                wire.extend_from_slice(extra);
            }
            wire
        };
        // Unknown fields: up to MAX_UNKNOWN_FIELDS skipped, one more refused.
        assert!(infer_request_bound(&with(&[0x52, 0], MAX_UNKNOWN_FIELDS)).is_ok());
        let e = infer_request_bound(&with(&[0x52, 0], MAX_UNKNOWN_FIELDS + 1)).unwrap_err();
        assert!(e.contains("no known number"), "{e}");
        // Parameters of the request: as over HTTP.
        let max = super::super::codec::MAX_PARAMETERS;
        let entry = |key: u8| [0x22, 3, 0x0a, 1, key];
        let mut wire = base.clone();
        for i in 0..max {
            // (keys of one ASCII byte: a key is a string, UTF-8)
            wire.extend_from_slice(&entry((i % 0x80) as u8));
        }
        assert!(infer_request_bound(&wire).is_ok());
        wire.extend_from_slice(&entry(0));
        let e = infer_request_bound(&wire).unwrap_err();
        assert!(e.contains("parameters"), "{e}");
        // An input's shape: packed and not, together.
        let dims = super::super::codec::MAX_DIMS;
        let input = |packed: usize, unpacked: usize| {
            let mut tensor = vec![0x1a, packed as u8];
            tensor.extend(std::iter::repeat_n(1u8, packed));
            for _ in 0..unpacked {
                tensor.extend_from_slice(&[0x18, 1]);
            }
            let mut wire = base.clone();
            wire.extend_from_slice(&[0x2a, tensor.len() as u8]);
            wire.extend_from_slice(&tensor);
            wire
        };
        assert!(infer_request_bound(&input(dims - 1, 1)).is_ok());
        let e = infer_request_bound(&input(dims, 1)).unwrap_err();
        assert!(e.contains("dimensions"), "{e}");
        // A singular field repeated (`id`, empty), unknown fields inside a parameter's entry
        // or inside its value: counted with the unknown fields (a re-attack's findings).
        let e = infer_request_bound(&with(&[0x1a, 0], MAX_UNKNOWN_FIELDS + 2)).unwrap_err();
        assert!(e.contains("repeated singular"), "{e}");
        assert!(infer_request_bound(&with(&[0x1a, 0], MAX_UNKNOWN_FIELDS + 1)).is_ok());
        let n = MAX_UNKNOWN_FIELDS + 1;
        // A length-delimited field: its key, its length as a varint, its bytes.
        let field = |key: u8, inner: &[u8]| {
            let mut out = vec![key];
            let mut len = inner.len();
            while len >= 0x80 {
                out.push((len as u8 & 0x7f) | 0x80);
                len >>= 7;
            }
            out.push(len as u8);
            out.extend_from_slice(inner);
            out
        };
        let after_base = |extra: Vec<u8>| [base.as_slice(), &extra].concat();
        // field 4 (parameters): an entry of `inner`
        let nested = |inner: Vec<u8>| after_base(field(0x22, &inner));
        let unknowns = [0x50u8, 0].repeat(n);
        let in_entry = [&[0x0a, 1, b'k'][..], &unknowns].concat();
        assert!(infer_request_bound(&nested(in_entry)).is_err());
        let in_value = [&[0x0a, 1, b'k'][..], &field(0x12, &unknowns)].concat();
        assert!(infer_request_bound(&nested(in_value)).is_err());
        // Empty pieces of a packed field (shape, contents), and elements not packed
        // beyond MAX_UNPACKED_ELEMENTS (a re-attack's findings).
        let with_input = |tensor: Vec<u8>| after_base(field(0x2a, &tensor));
        let e = infer_request_bound(&with_input([0x1a, 0].repeat(n + 1))).unwrap_err();
        assert!(e.contains("repeated singular"), "{e}");
        let in_contents =
            |piece: &[u8], times: usize| with_input(field(0x2a, &piece.repeat(times)));
        assert!(infer_request_bound(&in_contents(&[0x12, 0], n + 1)).is_err());
        // (the input itself is one of the elements counted)
        assert!(infer_request_bound(&in_contents(&[0x08, 1], MAX_UNPACKED_ELEMENTS - 1)).is_ok());
        let e =
            infer_request_bound(&in_contents(&[0x08, 1], MAX_UNPACKED_ELEMENTS + 1)).unwrap_err();
        assert!(e.contains("not packed"), "{e}");
        // Strings of bytes_contents and raw_input_contents entries, empty ones too.
        assert!(infer_request_bound(&in_contents(&[0x42, 0], MAX_UNPACKED_ELEMENTS + 1)).is_err());
        let raw = after_base([0x3a, 0].repeat(MAX_UNPACKED_ELEMENTS + 1));
        assert!(infer_request_bound(&raw).is_err());
        // An ordinary parameter passes, and the wire bound agrees with prost on it.
        let ok = nested(vec![0x0a, 1, b'k', 0x12, 2, 0x08, 1]);
        assert!(ModelInferRequest::decode(ok.as_slice()).is_ok());
        assert!(infer_request_bound(&ok).is_ok());
    }

    /// What prost refuses, the walk refuses first, so that the call is answered
    /// INVALID_ARGUMENT and audited like any malformed message (these passed the walk, and
    /// prost's refusal inside tonic was answered INTERNAL, unaudited: a red-team finding).
    #[test]
    fn what_prost_refuses_the_walk_refuses() {
        let mut ten = vec![0xff; 9];
        ten.push(0x02); // a tenth byte over bit 63
        let mut eleven = vec![0xff; 10];
        eleven.push(0x01);
        let packed_shape = |v: &[u8]| {
            let mut input = vec![0x1a, v.len() as u8];
            input.extend_from_slice(v);
            let mut m = vec![0x2a, input.len() as u8];
            m.extend(input);
            m
        };
        for bad in [
            vec![0x0a, 1, 0xff],                         // model_name
            vec![0x12, 1, 0xff],                         // model_version
            vec![0x1a, 2, 0xc3, 0x28],                   // id
            vec![0x2a, 3, 0x0a, 1, 0xff],                // an input's name
            vec![0x2a, 3, 0x12, 1, 0xff],                // an input's datatype
            vec![0x32, 3, 0x0a, 1, 0xff],                // an output's name
            vec![0x22, 3, 0x0a, 1, 0xff],                // a parameter's key
            vec![0x22, 5, 0x12, 3, 0x1a, 1, 0xff],       // a string parameter
            vec![0x2a, 7, 0x2a, 5, 0x32, 3, 0, 0, 0],    // fp32 contents of 3 bytes
            vec![0x2a, 8, 0x2a, 6, 0x3a, 4, 0, 0, 0, 0], // fp64 contents of 4 bytes
            packed_shape(&ten),
            packed_shape(&eleven),
            [&[0x08][..], &ten].concat(), // a varint field over 64 bits (unknown field 1 varint: wrong type, also refused)
            [&[0x48][..], &ten].concat(), // an unknown varint field over 64 bits
            // A key over 32 bits (field 2^29; prost: "invalid key value"), at the top and
            // inside an input (a re-attack's finding).
            vec![0x80, 0x80, 0x80, 0x80, 0x10, 0x00],
            vec![0x2a, 6, 0x80, 0x80, 0x80, 0x80, 0x10, 0x00],
            // Groups: one never closed, one closed by another field's end, an end alone.
            vec![0x4b, 0x08, 0x05],
            vec![0x4b, 0x54],
            vec![0x4c],
        ] {
            assert!(
                ModelInferRequest::decode(bad.as_slice()).is_err(),
                "prost takes {bad:x?}"
            );
            assert!(infer_request_bound(&bad).is_err(), "{bad:x?}");
        }
        // An unknown group, fields inside it and nested groups, is skipped as prost skips it
        // (the walk refused groups: a re-attack's finding).
        let grouped = [
            0x0a, 1, b'm', 0x4b, 0x08, 0x05, 0x5b, 0x10, 0x01, 0x5c, 0x4c,
        ]
        .to_vec();
        assert!(ModelInferRequest::decode(grouped.as_slice()).is_ok());
        assert!(infer_request_bound(&grouped).is_ok());
        // Groups nested past the walk's depth are refused.
        let deep = [vec![0x4b; 70], vec![0x4c; 70]].concat();
        assert!(infer_request_bound(&deep).is_err());
        // The largest ten-byte varint is a varint, for both.
        let mut max = vec![0xff; 9];
        max.push(0x01);
        let ok = packed_shape(&max);
        assert!(ModelInferRequest::decode(ok.as_slice()).is_ok());
        assert!(infer_request_bound(&ok).is_ok());
        let text = [vec![0x0a, 2], "é".as_bytes().to_vec()].concat();
        assert!(ModelInferRequest::decode(text.as_slice()).is_ok());
        assert!(infer_request_bound(&text).is_ok());
    }

    #[test]
    fn unknown_fields_are_skipped_and_malformed_messages_refused() {
        let mut wire = ModelInferRequest {
            model_name: "m".into(),
            ..Default::default()
        }
        .encode_to_vec();
        // Unknown fields of every wire type: skipped, as prost skips them.
        wire.extend_from_slice(&[0x48, 0x96, 0x01]); // field 9 varint
        wire.extend_from_slice(&[0x51, 1, 2, 3, 4, 5, 6, 7, 8]); // field 10 fixed64
        wire.extend_from_slice(&[0x5a, 2, b'h', b'i']); // field 11 bytes
        wire.extend_from_slice(&[0x65, 1, 2, 3, 4]); // field 12 fixed32
        assert!(ModelInferRequest::decode(wire.as_slice()).is_ok());
        assert_eq!(infer_request_bound(&wire).unwrap(), 1);
        for bad in [
            vec![0x0a, 5, b'a'],          // a length past the end
            vec![0x0a],                   // a key without its value
            vec![0x80],                   // a varint cut short
            vec![0x08, 1],                // model_name as a varint
            vec![0x00, 1],                // field 0
            vec![0x4b],                   // a group
            vec![0x2a, 3, 0x1a, 1, 0x80], // an input's shape ending inside a varint
            vec![0x2a, 2, 0x2a, 5],       // contents past its input's end
            vec![0xff; 11],               // a varint of 11 bytes
        ] {
            assert!(infer_request_bound(&bad).is_err(), "{bad:x?}");
        }
    }
}
