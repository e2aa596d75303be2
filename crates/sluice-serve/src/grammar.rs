//! Constrained decoding: a grammar over bytes (literals, JSON values shaped
//! by a JSON Schema, free text up to a terminator) and a [`Matcher`] that
//! says whether a token's bytes can continue it. It makes the tool call a
//! request demands (`tool_choice` "required" or a named function): the
//! call's syntax is the template family's own, the name is one of the
//! tools', and the arguments are JSON that the tool's parameter schema
//! admits.
//!
//! Schema coverage: `type` (one or several), `properties` / `required`
//! (keys in any order, each at most once, required ones present; an
//! object with declared properties takes no others), `items`, `enum`,
//! `const`, `anyOf` / `oneOf`, a one-element `allOf`, `maxLength`.
//! Anything else (`$ref`, `pattern`, numeric bounds, `minItems`) is not
//! enforced: the value there is any JSON of the stated type.

use crate::template::Family;
use serde_json::Value as Json;
use std::sync::{Arc, OnceLock};

/// A grammar node.
#[derive(Debug)]
pub enum Node {
    /// Exactly these bytes.
    Lit(Vec<u8>),
    /// Each in turn.
    Seq(Vec<Arc<Node>>),
    /// Any one of them.
    Alt(Vec<Arc<Node>>),
    /// Any JSON value.
    Any,
    /// A JSON object: the listed properties, or any keys when `open`.
    Object {
        /// Declared properties.
        props: Vec<Prop>,
        /// Any keys with any values.
        open: bool,
    },
    /// A JSON array of values of one node.
    Array(Arc<Node>),
    /// A JSON string of at most `max` characters.
    Str {
        /// Characters at most.
        max: usize,
    },
    /// A JSON number.
    Num {
        /// No fraction or exponent.
        integer: bool,
    },
    /// Raw text (at most `max` bytes) ended by `until` (included).
    Text {
        /// The terminator.
        until: Vec<u8>,
        /// Bytes at most before it.
        max: usize,
    },
}

/// A declared object property.
#[derive(Debug)]
pub struct Prop {
    /// The key as JSON writes it between its quotes.
    key: Vec<u8>,
    value: Arc<Node>,
    required: bool,
}

fn lit(s: &str) -> Arc<Node> {
    Arc::new(Node::Lit(s.as_bytes().to_vec()))
}

fn seq(v: Vec<Arc<Node>>) -> Arc<Node> {
    Arc::new(Node::Seq(v))
}

/// Nesting deeper than this in a schema is taken as any value.
const MAX_SCHEMA_DEPTH: usize = 16;
/// Declared properties at most (a bit each); more make an open object.
const MAX_PROPS: usize = 64;

/// The node for values that `schema` admits.
pub fn from_schema(schema: &Json) -> Arc<Node> {
    schema_node(schema, 0)
}

fn schema_node(s: &Json, depth: usize) -> Arc<Node> {
    let Json::Object(o) = s else {
        return Arc::new(Node::Any);
    };
    if depth > MAX_SCHEMA_DEPTH {
        return Arc::new(Node::Any);
    }
    if let Some(c) = o.get("const") {
        return lit(&c.to_string());
    }
    if let Some(Json::Array(e)) = o.get("enum") {
        if !e.is_empty() {
            return Arc::new(Node::Alt(e.iter().map(|v| lit(&v.to_string())).collect()));
        }
    }
    for k in ["anyOf", "oneOf"] {
        if let Some(Json::Array(a)) = o.get(k) {
            if !a.is_empty() {
                return Arc::new(Node::Alt(
                    a.iter().map(|x| schema_node(x, depth + 1)).collect(),
                ));
            }
        }
    }
    if let Some(Json::Array(a)) = o.get("allOf") {
        if a.len() == 1 {
            return schema_node(&a[0], depth + 1);
        }
    }
    let types: Vec<&str> = match o.get("type") {
        Some(Json::String(t)) => vec![t.as_str()],
        Some(Json::Array(a)) => a.iter().filter_map(Json::as_str).collect(),
        _ if o.contains_key("properties") => vec!["object"],
        _ if o.contains_key("items") => vec!["array"],
        _ => return Arc::new(Node::Any),
    };
    let one = |t: &str| -> Arc<Node> {
        match t {
            "string" => Arc::new(Node::Str {
                max: o
                    .get("maxLength")
                    .and_then(Json::as_u64)
                    .map_or(usize::MAX, |m| m as usize),
            }),
            "integer" => Arc::new(Node::Num { integer: true }),
            "number" => Arc::new(Node::Num { integer: false }),
            "boolean" => Arc::new(Node::Alt(vec![lit("true"), lit("false")])),
            "null" => lit("null"),
            "array" => Arc::new(Node::Array(
                o.get("items")
                    .map_or_else(|| Arc::new(Node::Any), |i| schema_node(i, depth + 1)),
            )),
            "object" => object_node(o, depth),
            _ => Arc::new(Node::Any),
        }
    };
    match types.as_slice() {
        [] => Arc::new(Node::Any),
        [t] => one(t),
        ts => Arc::new(Node::Alt(ts.iter().map(|t| one(t)).collect())),
    }
}

fn object_node(o: &serde_json::Map<String, Json>, depth: usize) -> Arc<Node> {
    let props = match o.get("properties") {
        Some(Json::Object(p)) if !p.is_empty() && p.len() <= MAX_PROPS => p,
        _ => {
            return Arc::new(Node::Object {
                props: Vec::new(),
                open: true,
            })
        }
    };
    let required: Vec<&str> = o
        .get("required")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();
    Arc::new(Node::Object {
        props: props
            .iter()
            .map(|(k, v)| {
                let quoted = Json::String(k.clone()).to_string();
                Prop {
                    key: quoted.as_bytes()[1..quoted.len() - 1].to_vec(),
                    value: schema_node(v, depth + 1),
                    required: required.contains(&k.as_str()),
                }
            })
            .collect(),
        open: false,
    })
}

/// Whitespace bytes in a row at most between JSON tokens (enough for
/// indented output, not for a model that emits nothing else).
const MAX_WS: u8 = 16;
/// Frames at most on a stack (JSON nesting).
const MAX_DEPTH: usize = 64;
/// Alternatives followed at once.
const MAX_THREADS: usize = 256;
/// Digits at most in a number's integer part and in its fraction (an
/// integer fits an i64), and in its exponent (the value fits an f64).
const MAX_DIGITS: u8 = 18;
const MAX_EXP_DIGITS: u8 = 2;

/// A node compared by identity, so that equal parser states dedup.
#[derive(Clone, Debug)]
struct NodeRef(Arc<Node>);

impl PartialEq for NodeRef {
    fn eq(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum StrSt {
    Normal,
    Esc,
    Hex(u8),
    Utf8(u8),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum NumSt {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ObjSt {
    Open,
    Key,
    AfterKey,
    Colon,
    AfterValue,
    Comma,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ArrSt {
    Open,
    AfterItem,
    Comma,
}

#[derive(Clone, Debug, PartialEq)]
enum Frame {
    Expect(NodeRef),
    Lit(NodeRef, usize),
    Str {
        len: usize,
        max: usize,
        st: StrSt,
    },
    Text {
        node: NodeRef,
        len: usize,
        utf8: u8,
        tail: Vec<u8>,
        /// Bytes of the terminator matched once its tag has been seen.
        closing: usize,
    },
    Num {
        st: NumSt,
        integer: bool,
        digits: u8,
    },
    Obj {
        node: NodeRef,
        used: u64,
        st: ObjSt,
        key: Vec<u8>,
        ws: u8,
    },
    Arr {
        items: NodeRef,
        st: ArrSt,
        ws: u8,
    },
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// The nodes `Any` stands for, made once so that their states dedup.
fn any_nodes() -> &'static [Arc<Node>; 3] {
    static N: OnceLock<[Arc<Node>; 3]> = OnceLock::new();
    N.get_or_init(|| {
        [
            Arc::new(Node::Object {
                props: Vec::new(),
                open: true,
            }),
            Arc::new(Node::Array(Arc::new(Node::Any))),
            Arc::new(Node::Any),
        ]
    })
}

/// A UTF-8 byte inside text: `Some(continuation bytes still due)`, or
/// `None` when it cannot come here.
fn utf8_step(due: u8, b: u8) -> Option<u8> {
    match (due, b) {
        (0, 0x00..=0x7f) => Some(0),
        (0, 0xc2..=0xdf) => Some(1),
        (0, 0xe0..=0xef) => Some(2),
        (0, 0xf0..=0xf4) => Some(3),
        (d, 0x80..=0xbf) if d > 0 => Some(d - 1),
        _ => None,
    }
}

/// Feeds byte `b` to one parser stack; surviving stacks go to `out`.
/// `special`: the byte belongs to an added token, which only a literal
/// may take (a special token inside a JSON string would be a different
/// token sequence than the text it spells).
fn step(mut st: Vec<Frame>, b: u8, special: bool, out: &mut Vec<Vec<Frame>>) {
    if st.len() > MAX_DEPTH {
        return;
    }
    loop {
        let Some(top) = st.last_mut() else {
            return;
        };
        if special && !matches!(top, Frame::Lit(..) | Frame::Expect(_)) {
            return;
        }
        match top {
            Frame::Expect(n) => {
                let n = n.0.clone();
                st.pop();
                if special && !matches!(&*n, Node::Lit(_) | Node::Seq(_) | Node::Alt(_)) {
                    return;
                }
                match &*n {
                    Node::Lit(_) => st.push(Frame::Lit(NodeRef(n), 0)),
                    Node::Seq(v) => {
                        st.extend(v.iter().rev().map(|x| Frame::Expect(NodeRef(x.clone()))))
                    }
                    Node::Alt(v) => {
                        for x in v {
                            let mut s = st.clone();
                            s.push(Frame::Expect(NodeRef(x.clone())));
                            step(s, b, special, out);
                        }
                        return;
                    }
                    Node::Any => {
                        let [obj, arr, _] = any_nodes();
                        let next = match b {
                            b'{' => Frame::Expect(NodeRef(obj.clone())),
                            b'[' => Frame::Expect(NodeRef(arr.clone())),
                            b'"' => Frame::Str {
                                len: 0,
                                max: usize::MAX,
                                st: StrSt::Normal,
                            },
                            b'-' | b'0'..=b'9' => Frame::Num {
                                st: NumSt::Start,
                                integer: false,
                                digits: 0,
                            },
                            b't' => Frame::Lit(NodeRef(any_lit(0)), 0),
                            b'f' => Frame::Lit(NodeRef(any_lit(1)), 0),
                            b'n' => Frame::Lit(NodeRef(any_lit(2)), 0),
                            _ => return,
                        };
                        if matches!(next, Frame::Str { .. }) {
                            // The opening quote is this byte.
                            st.push(next);
                            break;
                        }
                        st.push(next);
                    }
                    Node::Object { .. } => {
                        if b != b'{' {
                            return;
                        }
                        st.push(Frame::Obj {
                            node: NodeRef(n),
                            used: 0,
                            st: ObjSt::Open,
                            key: Vec::new(),
                            ws: 0,
                        });
                        break;
                    }
                    Node::Array(items) => {
                        if b != b'[' {
                            return;
                        }
                        st.push(Frame::Arr {
                            items: NodeRef(items.clone()),
                            st: ArrSt::Open,
                            ws: 0,
                        });
                        break;
                    }
                    Node::Str { max } => {
                        if b != b'"' {
                            return;
                        }
                        st.push(Frame::Str {
                            len: 0,
                            max: *max,
                            st: StrSt::Normal,
                        });
                        break;
                    }
                    Node::Num { integer } => st.push(Frame::Num {
                        st: NumSt::Start,
                        integer: *integer,
                        digits: 0,
                    }),
                    Node::Text { .. } => st.push(Frame::Text {
                        node: NodeRef(n),
                        len: 0,
                        utf8: 0,
                        tail: Vec::new(),
                        closing: 0,
                    }),
                }
                if st.len() > MAX_DEPTH {
                    return;
                }
            }
            Frame::Lit(n, at) => {
                let Node::Lit(bytes) = &*n.0 else {
                    return;
                };
                if bytes.get(*at) != Some(&b) {
                    return;
                }
                *at += 1;
                if *at == bytes.len() {
                    st.pop();
                }
                break;
            }
            Frame::Str { len, max, st: s } => {
                let next = match (*s, b) {
                    (StrSt::Normal, b'"') => {
                        st.pop();
                        break;
                    }
                    (StrSt::Normal, _) if *len >= *max => return,
                    (StrSt::Normal, b'\\') => StrSt::Esc,
                    (StrSt::Normal, 0x00..=0x1f) => return,
                    (StrSt::Normal, _) => match utf8_step(0, b) {
                        Some(0) => {
                            *len += 1;
                            StrSt::Normal
                        }
                        Some(d) => {
                            *len += 1;
                            StrSt::Utf8(d)
                        }
                        None => return,
                    },
                    (StrSt::Utf8(d), _) => match utf8_step(d, b) {
                        Some(0) => StrSt::Normal,
                        Some(d) => StrSt::Utf8(d),
                        None => return,
                    },
                    (StrSt::Esc, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                        *len += 1;
                        StrSt::Normal
                    }
                    (StrSt::Esc, b'u') => {
                        *len += 1;
                        StrSt::Hex(4)
                    }
                    (StrSt::Esc, _) => return,
                    (StrSt::Hex(k), _) if b.is_ascii_hexdigit() => {
                        if k == 1 {
                            StrSt::Normal
                        } else {
                            StrSt::Hex(k - 1)
                        }
                    }
                    (StrSt::Hex(_), _) => return,
                };
                *s = next;
                break;
            }
            Frame::Text {
                node,
                len,
                utf8,
                tail,
                closing,
            } => {
                let Node::Text { until, max } = &*node.0 else {
                    return;
                };
                if *closing > 0 {
                    // The tag was written: only the rest of the
                    // terminator may follow.
                    if until.get(*closing) != Some(&b) {
                        return;
                    }
                    *closing += 1;
                    if *closing == until.len() {
                        st.pop();
                    }
                    break;
                }
                let Some(due) = utf8_step(*utf8, b) else {
                    return;
                };
                *utf8 = due;
                tail.push(b);
                if tail.len() > until.len() {
                    tail.remove(0);
                }
                // The terminator up to its tag's end (`\n</parameter>` of
                // `\n</parameter>\n`): the tag may appear nowhere else.
                let tag_end = until.len() - until.iter().rev().take_while(|c| is_ws(**c)).count();
                let tag = &until[until[..tag_end]
                    .iter()
                    .position(|c| !is_ws(*c))
                    .unwrap_or(0)..tag_end];
                if tail.ends_with(tag) {
                    if !tail.ends_with(&until[..tag_end]) {
                        return;
                    }
                    if tag_end == until.len() {
                        st.pop();
                    } else {
                        *closing = tag_end;
                    }
                } else {
                    *len += 1;
                    // Past `max` only the terminator may still come.
                    if *len > *max + until.len() {
                        return;
                    }
                }
                break;
            }
            Frame::Num {
                st: s,
                integer,
                digits,
            } => {
                let digit = b.is_ascii_digit();
                let next = match (*s, b) {
                    (NumSt::Start, b'-') => Some(NumSt::Minus),
                    // "-0" reads as the float -0.0 in serde_json and
                    // JavaScript: an integer is written without it.
                    (NumSt::Minus, b'0') if *integer => None,
                    (NumSt::Start | NumSt::Minus, b'0') => Some(NumSt::Zero),
                    (NumSt::Start | NumSt::Minus, _) if digit => Some(NumSt::Int),
                    (NumSt::Int, _) if digit => Some(NumSt::Int),
                    (NumSt::Zero | NumSt::Int, b'.') if !*integer => Some(NumSt::Dot),
                    (NumSt::Dot | NumSt::Frac, _) if digit => Some(NumSt::Frac),
                    (NumSt::Zero | NumSt::Int | NumSt::Frac, b'e' | b'E') if !*integer => {
                        Some(NumSt::E)
                    }
                    (NumSt::E, b'+' | b'-') => Some(NumSt::ESign),
                    (NumSt::E | NumSt::ESign | NumSt::Exp, _) if digit => Some(NumSt::Exp),
                    _ => None,
                };
                // `digits` counts within the current part.
                let cap = if matches!(*s, NumSt::E | NumSt::ESign | NumSt::Exp) {
                    MAX_EXP_DIGITS
                } else {
                    MAX_DIGITS
                };
                match next {
                    Some(n) if !(digit && *digits >= cap) => {
                        if matches!(n, NumSt::Dot | NumSt::E) {
                            *digits = 0;
                        }
                        *s = n;
                        *digits += u8::from(digit);
                        break;
                    }
                    _ => {
                        // A finished number ends at the byte after it,
                        // which the frame below takes.
                        if !matches!(*s, NumSt::Zero | NumSt::Int | NumSt::Frac | NumSt::Exp) {
                            return;
                        }
                        st.pop();
                    }
                }
            }
            Frame::Obj {
                node,
                used,
                st: s,
                key,
                ws,
            } => {
                let Node::Object { props, open } = &*node.0 else {
                    return;
                };
                let (open, props) = (*open, props);
                if is_ws(b) && *s != ObjSt::Key {
                    if *ws >= MAX_WS {
                        return;
                    }
                    *ws += 1;
                    break;
                }
                *ws = 0;
                let unused = |i: usize| *used & (1u64 << i) == 0;
                let all_required = props
                    .iter()
                    .enumerate()
                    .all(|(i, p)| !p.required || !unused(i));
                match (*s, b) {
                    (ObjSt::Open | ObjSt::AfterValue, b'}') if all_required => {
                        st.pop();
                        break;
                    }
                    (ObjSt::Open | ObjSt::Comma, b'"') => {
                        if open {
                            *s = ObjSt::AfterKey;
                            st.push(Frame::Str {
                                len: 0,
                                max: usize::MAX,
                                st: StrSt::Normal,
                            });
                        } else {
                            *s = ObjSt::Key;
                            key.clear();
                        }
                        break;
                    }
                    (ObjSt::Key, b'"') => {
                        let Some(i) = (0..props.len()).find(|&i| unused(i) && props[i].key == *key)
                        else {
                            return;
                        };
                        *used |= 1u64 << i;
                        *s = ObjSt::AfterKey;
                        break;
                    }
                    (ObjSt::Key, _) => {
                        key.push(b);
                        if !(0..props.len()).any(|i| unused(i) && props[i].key.starts_with(key)) {
                            return;
                        }
                        break;
                    }
                    (ObjSt::AfterKey, b':') => {
                        *s = ObjSt::Colon;
                        break;
                    }
                    (ObjSt::Colon, _) => {
                        // The value starts with this byte: the key's node
                        // (the last one marked used) takes it.
                        let value = if open {
                            any_nodes()[2].clone()
                        } else {
                            let Some(i) =
                                (0..props.len()).find(|&i| props[i].key == *key && !unused(i))
                            else {
                                return;
                            };
                            props[i].value.clone()
                        };
                        *s = ObjSt::AfterValue;
                        st.push(Frame::Expect(NodeRef(value)));
                    }
                    (ObjSt::AfterValue, b',') => {
                        let more = open || (0..props.len()).any(unused);
                        if !more {
                            return;
                        }
                        *s = ObjSt::Comma;
                        break;
                    }
                    _ => return,
                }
            }
            Frame::Arr { items, st: s, ws } => {
                if is_ws(b) {
                    if *ws >= MAX_WS {
                        return;
                    }
                    *ws += 1;
                    break;
                }
                *ws = 0;
                match (*s, b) {
                    (ArrSt::Open | ArrSt::AfterItem, b']') => {
                        st.pop();
                        break;
                    }
                    (ArrSt::AfterItem, b',') => {
                        *s = ArrSt::Comma;
                        break;
                    }
                    (ArrSt::Open | ArrSt::Comma, _) => {
                        let n = items.clone();
                        *s = ArrSt::AfterItem;
                        st.push(Frame::Expect(n));
                    }
                    _ => return,
                }
            }
        }
    }
    out.push(st);
}

/// `true`, `false`, `null` as nodes made once.
fn any_lit(i: usize) -> Arc<Node> {
    static L: OnceLock<[Arc<Node>; 3]> = OnceLock::new();
    L.get_or_init(|| [lit("true"), lit("false"), lit("null")])[i].clone()
}

/// Where a grammar stands after the bytes fed so far: every way of
/// parsing them that is still alive.
#[derive(Clone, Debug)]
pub struct Matcher {
    threads: Vec<Vec<Frame>>,
}

impl Matcher {
    /// At the start of `g`.
    pub fn new(g: &Arc<Node>) -> Matcher {
        Matcher {
            threads: vec![vec![Frame::Expect(NodeRef(g.clone()))]],
        }
    }

    /// The matcher after `bytes`, or `None` if no text of the grammar
    /// starts with what has been fed and them. Empty `bytes` are refused
    /// (a token that adds nothing could repeat forever).
    pub fn feed(&self, bytes: &[u8], special: bool) -> Option<Matcher> {
        if bytes.is_empty() {
            return None;
        }
        let mut cur = self.threads.clone();
        for &b in bytes {
            let mut next = Vec::with_capacity(cur.len());
            for t in cur {
                step(t, b, special, &mut next);
            }
            let mut dedup: Vec<Vec<Frame>> = Vec::with_capacity(next.len());
            for t in next {
                if !dedup.contains(&t) {
                    dedup.push(t);
                }
            }
            dedup.truncate(MAX_THREADS);
            if dedup.is_empty() {
                return None;
            }
            cur = dedup;
        }
        Some(Matcher { threads: cur })
    }

    /// Whether what has been fed is a whole text of the grammar.
    pub fn is_complete(&self) -> bool {
        self.threads.iter().any(Vec::is_empty)
    }
}

/// A tool call the model must make: `prefix` is written after the prompt
/// (the model reads it as its own start), the model's tokens follow
/// `grammar`, and `suffix` closes the call.
#[derive(Clone, Debug)]
pub struct Forced {
    /// Text fed after the prompt.
    pub prefix: String,
    /// What the model may generate.
    pub grammar: Arc<Node>,
    /// Text that completes the call after the grammar's end.
    pub suffix: String,
}

/// A tool's name and parameter schema.
fn tool_parts(t: &Json) -> (String, Json) {
    let f = t.get("function").unwrap_or(t);
    (
        f.get("name")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string(),
        f.get("parameters")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object"})),
    )
}

/// An XML-style argument's value ended by `until`: strings as raw text,
/// other types as JSON.
fn xml_value(schema: &Json, until: &str) -> Arc<Node> {
    let ty = schema.get("type").and_then(Json::as_str);
    if let Some(Json::Array(e)) = schema.get("enum") {
        if !e.is_empty() && e.iter().all(Json::is_string) {
            let alts = e.iter().map(|v| lit(v.as_str().unwrap_or(""))).collect();
            return seq(vec![Arc::new(Node::Alt(alts)), lit(until)]);
        }
    }
    if ty == Some("string") {
        let max = schema
            .get("maxLength")
            .and_then(Json::as_u64)
            .map_or(usize::MAX / 2, |m| (m as usize).saturating_mul(4));
        return Arc::new(Node::Text {
            until: until.as_bytes().to_vec(),
            max,
        });
    }
    seq(vec![from_schema(schema), lit(until)])
}

/// XML-style arguments: each declared parameter in schema order (optional
/// ones may be left out), `open` and `close` around the key, `until`
/// after the value.
fn xml_args(schema: &Json, open: &str, mid: &str, until: &str) -> Arc<Node> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();
    let mut parts = Vec::new();
    if let Some(Json::Object(props)) = schema.get("properties") {
        for (k, v) in props {
            let one = seq(vec![lit(&format!("{open}{k}{mid}")), xml_value(v, until)]);
            parts.push(if required.contains(&k.as_str()) {
                one
            } else {
                Arc::new(Node::Alt(vec![one, seq(Vec::new())]))
            });
        }
    }
    seq(parts)
}

/// The forced call for `family` among `tools` (the one named `only`, when
/// given).
pub fn tool_call(family: Family, tools: &[Json], only: Option<&str>) -> Result<Forced, String> {
    let chosen: Vec<(String, Json)> = tools
        .iter()
        .map(tool_parts)
        .filter(|(n, _)| only.is_none_or(|o| o == n))
        .collect();
    if chosen.is_empty() {
        return Err(match only {
            Some(n) => format!("tool_choice names {n:?}, which is not among the tools"),
            None => "tool_choice \"required\" needs tools".into(),
        });
    }
    let alts = |one: &dyn Fn(&str, &Json) -> Arc<Node>| {
        Arc::new(Node::Alt(chosen.iter().map(|(n, s)| one(n, s)).collect()))
    };
    let (prefix, grammar, suffix) = match family {
        Family::Hermes => (
            "<tool_call>\n{\"name\": \"",
            alts(&|n, s| seq(vec![lit(&format!("{n}\", \"arguments\": ")), from_schema(s)])),
            "}\n</tool_call>",
        ),
        Family::DeepSeek => (
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>",
            alts(&|n, s| seq(vec![lit(&format!("{n}<｜tool▁sep｜>")), from_schema(s)])),
            "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
        Family::Harmony => (
            " to=functions.",
            alts(&|n, s| {
                seq(vec![
                    lit(&format!("{n}<|channel|>commentary json<|message|>")),
                    from_schema(s),
                ])
            }),
            "<|call|>",
        ),
        Family::Glm => (
            "<tool_call>",
            alts(&|n, s| {
                seq(vec![
                    lit(n),
                    xml_args(s, "\n<arg_key>", "</arg_key>\n<arg_value>", "</arg_value>"),
                ])
            }),
            "\n</tool_call>",
        ),
        Family::XmlFunction => (
            "<tool_call>\n<function=",
            alts(&|n, s| {
                seq(vec![
                    lit(&format!("{n}>\n")),
                    xml_args(s, "<parameter=", ">\n", "\n</parameter>\n"),
                ])
            }),
            "</function>\n</tool_call>",
        ),
        Family::Plain => {
            return Err("the chat template has no tool-call syntax sluice knows, so it cannot make the model call a tool; use tool_choice \"auto\" or \"none\"".into())
        }
    };
    Ok(Forced {
        prefix: prefix.into(),
        grammar,
        suffix: suffix.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools;
    use proptest::prelude::*;
    use serde_json::json;

    fn accepts(g: &Arc<Node>, s: &str) -> bool {
        Matcher::new(g)
            .feed(s.as_bytes(), false)
            .is_some_and(|m| m.is_complete())
    }

    fn prefix_ok(g: &Arc<Node>, s: &str) -> bool {
        Matcher::new(g).feed(s.as_bytes(), false).is_some()
    }

    fn weather() -> Json {
        json!({"type": "object", "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "exact": {"type": ["boolean", "null"]}},
            "required": ["city"]})
    }

    #[test]
    fn schema_shapes_the_json() {
        let g = from_schema(&weather());
        for ok in [
            r#"{"city": "Paris"}"#,
            r#"{"days": 3, "city": "Paris \"x\" \u00e9 é"}"#,
            "{\n  \"city\": \"Oslo\",\n  \"unit\": \"celsius\",\n  \"tags\": [\"a\", \"b\"],\n  \"exact\": null\n}",
            r#"{"city":"","exact":true,"tags":[]}"#,
        ] {
            assert!(accepts(&g, ok), "{ok}");
        }
        for bad in [
            r#"{}"#,
            r#"{"town": "Paris"}"#,
            r#"{"city": "Paris", "city": "Rome"}"#,
            r#"{"city": 3}"#,
            r#"{"city": "a", "days": 1.5}"#,
            r#"{"city": "a", "unit": "kelvin"}"#,
            r#"{"city": "a",}"#,
            "{\"city\": \"a\nb\"}",
            r#"{"city": "a"} "#,
        ] {
            assert!(!accepts(&g, bad), "{bad}");
        }
        assert!(prefix_ok(&g, r#"{"ci"#) && !prefix_ok(&g, r#"{"cx"#));
        // Numbers end at the byte after them.
        let n = from_schema(&json!({"type": "object", "properties": {"x": {"type": "number"}}}));
        assert!(accepts(&n, r#"{"x": -0.5e+3}"#) && accepts(&n, r#"{"x":12}"#));
        assert!(!accepts(&n, r#"{"x": 01}"#) && !accepts(&n, r#"{"x": 1.}"#));
        assert!(accepts(&n, r#"{"x": -0}"#));
        // An integer is never "-0" (a float to serde_json and JavaScript).
        assert!(accepts(&g, r#"{"city": "a", "days": -10}"#));
        assert!(!accepts(&g, r#"{"city": "a", "days": -0}"#));
        // Invalid UTF-8 is refused inside strings.
        assert!(Matcher::new(&g).feed(b"{\"city\": \"\xff", false).is_none());
        // A special token may only spell a literal.
        let l = seq(vec![lit("<|a|>"), from_schema(&json!({"type": "string"}))]);
        let m = Matcher::new(&l).feed(b"<|a|>", true).unwrap();
        assert!(m.feed(b"\"<|a|>", true).is_none());
        assert!(m.feed(b"\"x\"", false).unwrap().is_complete());
    }

    /// A random walk over the bytes the matcher allows, leaning on the
    /// bytes that close things so that it ends.
    fn walk(g: &Arc<Node>, seed: u64) -> Option<String> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut m = Matcher::new(g);
        let mut out = Vec::new();
        let closing = b"\"}]>,:0123456789-tfn{[\n";
        for _ in 0..4000 {
            if m.is_complete() {
                return String::from_utf8(out).ok();
            }
            let pool: Vec<u8> = if rng.f32() < 0.6 {
                closing.to_vec()
            } else {
                (0u8..=255).collect()
            };
            let ok: Vec<(u8, Matcher)> = pool
                .iter()
                .filter_map(|&b| m.feed(&[b], false).map(|n| (b, n)))
                .collect();
            let ok = if ok.is_empty() {
                (0u8..=255)
                    .filter_map(|b| m.feed(&[b], false).map(|n| (b, n)))
                    .collect()
            } else {
                ok
            };
            let (b, n) = ok.get(rng.usize(..ok.len().max(1)))?.clone();
            out.push(b);
            m = n;
        }
        None
    }

    fn check(v: &Json, s: &Json) {
        match s.get("type").and_then(Json::as_str) {
            Some("object") => {
                let o = v.as_object().unwrap();
                let props = s["properties"].as_object().unwrap();
                for k in o.keys() {
                    assert!(props.contains_key(k), "{k}");
                    check(&o[k], &props[k]);
                }
                for r in s["required"].as_array().unwrap() {
                    assert!(o.contains_key(r.as_str().unwrap()));
                }
            }
            Some("string") => assert!(v.is_string()),
            Some("integer") => assert!(v.is_i64() || v.is_u64(), "{v}"),
            Some("array") => {
                for x in v.as_array().unwrap() {
                    check(x, &s["items"]);
                }
            }
            _ => {}
        }
        if let Some(Json::Array(e)) = s.get("enum") {
            assert!(e.contains(v));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the matcher lets through is JSON that the schema admits.
        #[test]
        fn walks_give_valid_json(seed in any::<u64>()) {
            let s = weather();
            if let Some(t) = walk(&from_schema(&s), seed) {
                let v: Json = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
                check(&v, &s);
            }
            if let Some(t) = walk(&Arc::new(Node::Any), seed) {
                serde_json::from_str::<Json>(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
            }
        }

        /// Each family's forced call, completed by a walk, parses back as
        /// a call of one of the tools with arguments the schema admits.
        #[test]
        fn forced_calls_parse_back(seed in any::<u64>()) {
            let tools = [
                json!({"type": "function", "function": {"name": "get_weather", "parameters": weather()}}),
                json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}),
            ];
            for fam in [Family::Hermes, Family::DeepSeek, Family::Harmony, Family::Glm, Family::XmlFunction] {
                let f = tool_call(fam, &tools, None).unwrap();
                let Some(t) = walk(&f.grammar, seed) else { continue };
                let text = format!("{}{}{}", f.prefix, t, f.suffix);
                let p = tools::parse(fam, &text);
                prop_assert_eq!(p.tool_calls.len(), 1, "{:?} {}", fam, text);
                let c = &p.tool_calls[0];
                let schema = &tools.iter().find(|x| x["function"]["name"] == c.name.as_str()).unwrap()["function"]["parameters"];
                let args: Json = serde_json::from_str(&c.arguments).unwrap();
                if matches!(fam, Family::Glm | Family::XmlFunction) {
                    // Raw text values come back trimmed, and digits as numbers.
                    for r in schema["required"].as_array().unwrap() {
                        prop_assert!(args.get(r.as_str().unwrap()).is_some(), "{}", text);
                    }
                } else {
                    check(&args, schema);
                }
            }
        }
    }

    #[test]
    fn tool_choice_errors() {
        let tools = [json!({"type": "function", "function": {"name": "f"}})];
        assert!(tool_call(Family::Hermes, &tools, Some("g"))
            .unwrap_err()
            .contains("not among"));
        assert!(tool_call(Family::Plain, &tools, None).is_err());
        assert!(tool_call(Family::Hermes, &[], None).is_err());
        // No parameters: any object.
        let f = tool_call(Family::Hermes, &tools, Some("f")).unwrap();
        assert!(accepts(
            &f.grammar,
            r#"f", "arguments": {"a": [1, {"b": null}]}"#
        ));
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// What masking a 152k-token vocabulary costs at one step (the
    /// fallback when the model's first choices all fail); run by hand:
    /// `cargo test --release -p sluice-serve --lib grammar::cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn mask_a_large_vocabulary() {
        let mut rng = fastrand::Rng::with_seed(1);
        let vocab: Vec<Vec<u8>> = (0..152_000)
            .map(|_| (0..rng.usize(1..8)).map(|_| rng.u8(0x20..0x7f)).collect())
            .collect();
        let g = from_schema(&serde_json::json!({"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}));
        for (at, text) in [
            ("in a string", "{\"city\": \"Par"),
            ("after a key", "{\"city\""),
        ] {
            let m = Matcher::new(&g).feed(text.as_bytes(), false).unwrap();
            let t = std::time::Instant::now();
            let ok = vocab.iter().filter(|b| m.feed(b, false).is_some()).count();
            println!(
                "{at}: {ok} of {} tokens fit; mask in {:.1} ms",
                vocab.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}
