//! What an ONNX file must not hold, checked before either engine reads it.
//!
//! The check decodes the file with its own view of the ONNX protobuf (`onnx.proto`, IR
//! version 10): only the fields where a tensor, a graph or a symbolic dimension can be, in
//! every graph, subgraph, model-local function and training step. It does not use tract's
//! reader: that one was generated from an older `onnx.proto` and drops fields it does not
//! know (model-local functions, sparse attributes) without a word, while ONNX Runtime reads
//! them. A red-team pass found both ways out: a `Constant` inside a model-local function, or a
//! `Constant` with a `sparse_value`, whose tensor names an external data file made ONNX
//! Runtime read a file under the server's working directory (the audit digest key) into the
//! model's answer, outside every checksum and signature.
//!
//! Refused:
//! - a tensor stored in an external data file, wherever it is;
//! - a symbolic dimension (`dim_param`) longer than [`MAX_DIM_PARAM`] bytes: tract parses one
//!   as an expression with a recursive parser, and a few KB of parentheses or signs overflowed
//!   the loading thread's stack, which aborts the process (no unwinding to catch), at every
//!   start while the bundle is in the repository;
//! - more than [`MAX_NODES`] nodes in all;
//! - a file in ONNX Runtime's own format (`ORTM` at bytes 4..8), which ONNX Runtime loads
//!   from memory too, and whose contents this view cannot see;
//! - a graph that defines a value twice (two nodes' outputs, or a node's output named as a
//!   graph input or initializer), a subgraph (an `If`'s branch, a `Loop`'s or `Scan`'s body)
//!   included, whose names may not define again a name of the graphs around it: ONNX is
//!   single-assignment, ONNX Runtime refuses such a graph, and tract served the last
//!   definition (red-team findings).
//!
//! Protobuf nesting deeper than prost's limit (100 levels) fails to decode, and is refused as
//! unreadable.

use std::path::Path;

use prost::Message as _;

use crate::InferenceError;

/// The most nodes a model's graphs may hold (subgraphs and functions included). tract's
/// optimiser takes time growing with the square of the node count (a chain of 10 000 Relu:
/// 2.4 s in a debug build), and loads are one at a time, so a graph of millions of nodes
/// would hold every other load (a rollback included) for hours. Real models are far below it
/// (ResNet-50: ~180 nodes; BERT-large, Whisper: a few thousand).
pub const MAX_NODES: usize = 50_000;

/// The longest symbolic dimension name, in bytes. Exporters write `N`, `batch_size`,
/// `unk__123`, `sequence_length` or a short expression (`2*N`); tract parsed 1,000 nested
/// parentheses and overflowed its loading thread's stack at 3,000 (a debug build).
pub const MAX_DIM_PARAM: usize = 256;

#[derive(Clone, PartialEq, prost::Message)]
struct Model {
    #[prost(message, optional, tag = "7")]
    graph: Option<Graph>,
    #[prost(message, repeated, tag = "20")]
    training_info: Vec<TrainingInfo>,
    #[prost(message, repeated, tag = "25")]
    functions: Vec<Function>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TrainingInfo {
    #[prost(message, optional, tag = "1")]
    initialization: Option<Graph>,
    #[prost(message, optional, tag = "2")]
    algorithm: Option<Graph>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(message, repeated, tag = "7")]
    node: Vec<Node>,
    /// Default values of the function's attributes.
    #[prost(message, repeated, tag = "11")]
    attribute_proto: Vec<Attribute>,
    #[prost(message, repeated, tag = "12")]
    value_info: Vec<ValueInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Graph {
    #[prost(message, repeated, tag = "1")]
    node: Vec<Node>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<Tensor>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfo>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfo>,
    #[prost(message, repeated, tag = "13")]
    value_info: Vec<ValueInfo>,
    #[prost(message, repeated, tag = "15")]
    sparse_initializer: Vec<SparseTensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Node {
    #[prost(bytes = "vec", repeated, tag = "2")]
    output: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<Attribute>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Attribute {
    #[prost(message, optional, tag = "5")]
    t: Option<Tensor>,
    #[prost(message, optional, boxed, tag = "6")]
    g: Option<Box<Graph>>,
    #[prost(message, repeated, tag = "10")]
    tensors: Vec<Tensor>,
    #[prost(message, repeated, tag = "11")]
    graphs: Vec<Graph>,
    #[prost(message, optional, tag = "14")]
    tp: Option<Type>,
    #[prost(message, repeated, tag = "15")]
    type_protos: Vec<Type>,
    #[prost(message, optional, tag = "22")]
    sparse_tensor: Option<SparseTensor>,
    #[prost(message, repeated, tag = "23")]
    sparse_tensors: Vec<SparseTensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Tensor {
    /// Bytes, not a string: a name is only quoted in the refusal.
    #[prost(bytes = "vec", tag = "8")]
    name: Vec<u8>,
    #[prost(message, repeated, tag = "13")]
    external_data: Vec<Entry>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// `StringStringEntryProto`: only counted.
#[derive(Clone, PartialEq, prost::Message)]
struct Entry {}

#[derive(Clone, PartialEq, prost::Message)]
struct SparseTensor {
    #[prost(message, optional, tag = "1")]
    values: Option<Tensor>,
    #[prost(message, optional, tag = "2")]
    indices: Option<Tensor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueInfo {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    r#type: Option<Type>,
}

/// `TypeProto`: its `value` oneof read as plain optional fields (the same wire format).
#[derive(Clone, PartialEq, prost::Message)]
struct Type {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorType>,
    #[prost(message, optional, boxed, tag = "4")]
    sequence_type: Option<Box<ElementType>>,
    #[prost(message, optional, boxed, tag = "5")]
    map_type: Option<Box<MapType>>,
    #[prost(message, optional, tag = "8")]
    sparse_tensor_type: Option<TensorType>,
    #[prost(message, optional, boxed, tag = "9")]
    optional_type: Option<Box<ElementType>>,
}

/// `TypeProto.Tensor` and `TypeProto.SparseTensor`.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorType {
    #[prost(message, optional, tag = "2")]
    shape: Option<Shape>,
}

/// `TypeProto.Sequence` and `TypeProto.Optional`.
#[derive(Clone, PartialEq, prost::Message)]
struct ElementType {
    #[prost(message, optional, tag = "1")]
    elem_type: Option<Type>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MapType {
    #[prost(message, optional, tag = "2")]
    value_type: Option<Type>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Shape {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(bytes = "vec", optional, tag = "2")]
    dim_param: Option<Vec<u8>>,
}

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// What was found, in the order it is looked for.
#[derive(Default)]
struct Findings {
    nodes: usize,
    external: Option<String>,
    long_dim: Option<usize>,
}

impl Findings {
    fn tensor(&mut self, t: &Tensor) {
        if self.external.is_none() && (t.data_location == EXTERNAL || !t.external_data.is_empty()) {
            let name: String = String::from_utf8_lossy(&t.name).chars().take(64).collect();
            self.external = Some(name);
        }
    }

    fn sparse(&mut self, s: &SparseTensor) {
        for t in s.values.iter().chain(&s.indices) {
            self.tensor(t);
        }
    }

    fn graph(&mut self, g: &Graph) {
        for t in &g.initializer {
            self.tensor(t);
        }
        for s in &g.sparse_initializer {
            self.sparse(s);
        }
        for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
            self.value(v);
        }
        self.nodes(&g.node);
    }

    fn nodes(&mut self, nodes: &[Node]) {
        self.nodes = self.nodes.saturating_add(nodes.len());
        for a in nodes.iter().flat_map(|n| &n.attribute) {
            self.attribute(a);
        }
    }

    fn attribute(&mut self, a: &Attribute) {
        for t in a.t.iter().chain(&a.tensors) {
            self.tensor(t);
        }
        for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
            self.sparse(s);
        }
        for g in a.g.iter().map(|g| &**g).chain(&a.graphs) {
            self.graph(g);
        }
        for t in a.tp.iter().chain(&a.type_protos) {
            self.r#type(t);
        }
    }

    fn value(&mut self, v: &ValueInfo) {
        if let Some(t) = &v.r#type {
            self.r#type(t);
        }
    }

    fn r#type(&mut self, t: &Type) {
        for shape in t
            .tensor_type
            .iter()
            .chain(&t.sparse_tensor_type)
            .filter_map(|tt| tt.shape.as_ref())
        {
            for param in shape.dim.iter().filter_map(|d| d.dim_param.as_ref()) {
                if param.len() > MAX_DIM_PARAM {
                    self.long_dim = Some(self.long_dim.unwrap_or(0).max(param.len()));
                }
            }
        }
        let inner = t
            .sequence_type
            .iter()
            .chain(&t.optional_type)
            .filter_map(|e| e.elem_type.as_ref())
            .chain(t.map_type.iter().filter_map(|m| m.value_type.as_ref()));
        for e in inner {
            self.r#type(e);
        }
    }
}

/// Refuses a model holding what is listed in the module's documentation, naming why.
pub(crate) fn check(model: &[u8], name: &Path) -> Result<(), InferenceError> {
    // ONNX Runtime takes a buffer whose bytes 4..8 are "ORTM" as its own flatbuffer format
    // (`.ort`), which nothing here reads: a file that is both (its first bytes read as
    // protobuf fields) passed this check empty and was loaded by ONNX Runtime (a red-team
    // finding). Only ONNX files are loaded.
    if model.get(4..8) == Some(b"ORTM".as_slice()) {
        return Err(InferenceError::load(
            name,
            "the file is in ONNX Runtime's own format (.ort), not ONNX; only ONNX models are loaded",
        ));
    }
    let proto = Model::decode(model).map_err(|e| {
        InferenceError::load(name, format!("the file is not a readable ONNX model: {e}"))
    })?;
    if let Some(g) = &proto.graph {
        defined_once(g, &mut std::collections::HashSet::new(), 0, name)?;
    }
    let mut found = Findings::default();
    for g in proto.graph.iter().chain(
        proto
            .training_info
            .iter()
            .flat_map(|t| t.initialization.iter().chain(&t.algorithm)),
    ) {
        found.graph(g);
    }
    for f in &proto.functions {
        for a in &f.attribute_proto {
            found.attribute(a);
        }
        for v in &f.value_info {
            found.value(v);
        }
        found.nodes(&f.node);
    }
    if found.nodes > MAX_NODES {
        return Err(InferenceError::load(
            name,
            format!(
                "the graph has {} nodes, more than the {MAX_NODES} a model may have",
                found.nodes
            ),
        ));
    }
    if let Some(tensor) = found.external {
        return Err(InferenceError::load(
            name,
            format!(
                "tensor {tensor:?} is stored in an external data file; only self-contained \
                 models are loaded (re-export without external data)"
            ),
        ));
    }
    if let Some(len) = found.long_dim {
        return Err(InferenceError::load(
            name,
            format!(
                "a symbolic dimension's name is {len} bytes long, more than the \
                 {MAX_DIM_PARAM} a model may use"
            ),
        ));
    }
    Ok(())
}

/// Every value of graph `g` defined once, none a name `outer` (the graphs around it)
/// already defines: its inputs and initializers (an input may have an initializer of its
/// name, its default), then each node's outputs, then each node's subgraphs in the scope so
/// far. `outer` is given back as it was.
fn defined_once<'a>(
    g: &'a Graph,
    outer: &mut std::collections::HashSet<&'a [u8]>,
    depth: usize,
    name: &Path,
) -> Result<(), InferenceError> {
    let twice = |value: &[u8]| {
        let shown: String = String::from_utf8_lossy(value).chars().take(64).collect();
        InferenceError::load(
            name,
            format!(
                "the graph defines the value {shown:?} more than once (ONNX assigns each value once, subgraphs included)"
            ),
        )
    };
    // Prost's nesting limit (100) bounds the depth already; this keeps the recursion's own.
    if depth > 100 {
        return Err(InferenceError::load(name, "subgraphs nested too deep"));
    }
    let mut mine: std::collections::HashSet<&'a [u8]> = std::collections::HashSet::new();
    for v in g
        .input
        .iter()
        .map(|v| v.name.as_slice())
        .chain(g.initializer.iter().map(|t| t.name.as_slice()))
        .filter(|v| !v.is_empty())
    {
        if outer.contains(v) {
            return Err(twice(v));
        }
        mine.insert(v);
    }
    for node in &g.node {
        // An empty name is an optional output left out.
        for output in node.output.iter().filter(|o| !o.is_empty()) {
            if outer.contains(output.as_slice()) || !mine.insert(output.as_slice()) {
                return Err(twice(output));
            }
        }
    }
    let added: Vec<&'a [u8]> = mine.into_iter().collect();
    outer.extend(added.iter().copied());
    let result = g.node.iter().try_for_each(|node| {
        node.attribute.iter().try_for_each(|a| {
            a.g.iter()
                .map(|b| b.as_ref())
                .chain(a.graphs.iter())
                .try_for_each(|sub| defined_once(sub, outer, depth + 1, name))
        })
    });
    for v in added {
        outer.remove(v);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(output: &str) -> Node {
        Node {
            output: vec![output.as_bytes().to_vec()],
            attribute: vec![],
        }
    }

    fn value(name: &str) -> ValueInfo {
        ValueInfo {
            name: name.as_bytes().to_vec(),
            r#type: None,
        }
    }

    /// A value defined twice (two producers, or a node writing a graph input) is refused;
    /// an input with an initializer of its name (its default) and outputs left out are not.
    #[test]
    fn a_value_defined_twice_is_refused() {
        let model = |nodes: Vec<Node>| {
            Model {
                graph: Some(Graph {
                    node: nodes,
                    initializer: vec![Tensor {
                        name: b"x".to_vec(),
                        external_data: vec![],
                        data_location: 0,
                    }],
                    input: vec![value("x")],
                    output: vec![value("y")],
                    value_info: vec![],
                    sparse_initializer: vec![],
                }),
                training_info: vec![],
                functions: vec![],
            }
            .encode_to_vec()
        };
        check(&model(vec![node("y"), node("")]), Path::new("m.onnx")).unwrap();
        // Subgraphs (an If's two branches): each its own scope beside the other, inside the
        // graph around it.
        let branch = |outputs: &[&str]| Graph {
            node: outputs.iter().map(|o| node(o)).collect(),
            initializer: vec![],
            input: vec![],
            output: vec![],
            value_info: vec![],
            sparse_initializer: vec![],
        };
        let if_node = |then: Graph, otherwise: Graph| Node {
            output: vec![b"y".to_vec()],
            attribute: vec![
                Attribute {
                    g: Some(Box::new(then)),
                    ..Attribute::default()
                },
                Attribute {
                    g: Some(Box::new(otherwise)),
                    ..Attribute::default()
                },
            ],
        };
        check(
            &model(vec![if_node(branch(&["t", "u"]), branch(&["t", "u"]))]),
            Path::new("m.onnx"),
        )
        .unwrap();
        for nodes in [
            vec![node("y"), node("y")],
            vec![node("x"), node("y")],
            // Inside a branch: twice, or a name of the graph around it (an initializer, a
            // node's output): ONNX Runtime refuses them, tract served the last definition.
            vec![if_node(branch(&["t", "t"]), branch(&[]))],
            vec![if_node(branch(&["x"]), branch(&[]))],
            vec![if_node(branch(&[]), branch(&["y"]))],
        ] {
            let err = check(&model(nodes), Path::new("m.onnx")).unwrap_err();
            let why = std::error::Error::source(&err).map(|s| s.to_string());
            assert!(why.is_some_and(|w| w.contains("more than once")), "{err}");
        }
    }

    /// Red-team finding: bytes that ONNX Runtime reads as its own format and prost as an
    /// ONNX model with nothing in it (the root offset `08 00 09 00` is also two protobuf
    /// fields, the second covering "ORTM") passed the check. Refused by their magic.
    #[test]
    fn an_ort_format_file_is_refused() {
        let mut bytes = vec![0x08, 0x00, 0x09, 0x00];
        bytes.extend_from_slice(b"ORTM");
        bytes.extend_from_slice(&[0; 3]);
        assert!(Model::decode(bytes.as_slice()).is_ok(), "a valid protobuf");
        let err = check(&bytes, Path::new("m.onnx")).unwrap_err();
        let why = std::error::Error::source(&err).map(|s| s.to_string());
        assert!(
            why.is_some_and(|w| w.contains("ONNX Runtime's own format")),
            "{err}"
        );
    }
}
