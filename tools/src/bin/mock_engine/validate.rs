//! Request-shape validation as vLLM's OpenAI server does it, so a client (or
//! a gateway) that sends what a real engine refuses gets the real refusal.
//!
//! vLLM checks a request in two stages, and so does the mock:
//!
//! 1. FastAPI + pydantic v2 (lax mode) parse the body into the request model
//!    ([`check_shape`]): invalid JSON, a body that is not an object, a
//!    missing or mistyped field, `stream_options` without `stream=true`. The
//!    400's message is pydantic's error list as Python prints it, e.g.
//!    `[{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required', 'input': {...}}]`.
//! 2. After the model check (404 for an unknown model), the values
//!    ([`check_values`]): an empty conversation, and the `SamplingParams`
//!    checks (`n`, `temperature`, `top_p`, `max_tokens`), with vLLM's
//!    messages, e.g. `max_tokens must be at least 1, got -1.`.
//!
//! Either way the answer is 400 `BadRequestError` with `param: null`.
//! Unknown fields pass (vLLM's request models allow extra fields).

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::inference::Endpoint;

/// Errors listed in one message at most (pydantic lists all; a mock need not).
const MAX_ERRORS: usize = 16;
/// Characters of an `input` echoed in a message (the rest becomes `...`).
const MAX_INPUT_REPR: usize = 512;
/// Tag of the content-parts member of a message's `content` union.
const PARTS_TAG: &str = "list[ChatCompletionContentPartParam]";
const STREAM_OPTIONS_ERROR: &str = "Stream options can only be defined when `stream=True`.";

#[derive(Clone, Debug)]
enum Loc {
    Key(String),
    Index(usize),
}

impl From<&str> for Loc {
    fn from(s: &str) -> Self {
        Loc::Key(s.to_owned())
    }
}

impl From<usize> for Loc {
    fn from(i: usize) -> Self {
        Loc::Index(i)
    }
}

/// One pydantic error entry.
struct FieldError {
    kind: &'static str,
    loc: Vec<Loc>,
    msg: String,
    /// The offending input, already in Python's repr.
    input: String,
    /// The `ctx` dict, already in Python's repr.
    ctx: Option<String>,
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, kind: &'static str, loc: &[Loc], msg: &str, input: &Value) {
        self.push_ctx(kind, loc, msg, py_repr(input), None);
    }

    fn push_ctx(
        &mut self,
        kind: &'static str,
        loc: &[Loc],
        msg: &str,
        input: String,
        ctx: Option<String>,
    ) {
        if self.0.len() < MAX_ERRORS {
            self.0.push(FieldError {
                kind,
                loc: loc.to_vec(),
                msg: msg.to_owned(),
                input,
                ctx,
            });
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// FastAPI's `str(RequestValidationError)`: the error list's repr.
    fn render(&self) -> String {
        let mut out = String::from("[");
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str("{'type': ");
            py_str(e.kind, &mut out);
            out.push_str(", 'loc': (");
            for (j, l) in e.loc.iter().enumerate() {
                if j > 0 {
                    out.push_str(", ");
                }
                match l {
                    Loc::Key(k) => py_str(k, &mut out),
                    Loc::Index(n) => {
                        let _ = write!(out, "{n}");
                    }
                }
            }
            if e.loc.len() == 1 {
                out.push(',');
            }
            out.push_str("), 'msg': ");
            py_str(&e.msg, &mut out);
            out.push_str(", 'input': ");
            out.push_str(&e.input);
            if let Some(ctx) = &e.ctx {
                out.push_str(", 'ctx': ");
                out.push_str(ctx);
            }
            out.push('}');
        }
        out.push(']');
        out
    }
}

fn at(base: &[Loc], more: impl Into<Loc>) -> Vec<Loc> {
    let mut v = base.to_vec();
    v.push(more.into());
    v
}

/// Stage 1: parse `data` (already tried as `parsed`) into a request of kind
/// `endpoint`. `Err` carries the 400's message.
pub fn check_shape(
    endpoint: Endpoint,
    data: &[u8],
    parsed: Result<Value, serde_json::Error>,
) -> Result<Value, String> {
    let mut errs = Errors::default();
    let body = [Loc::from("body")];
    // FastAPI reads an empty body as no body at all.
    if data.is_empty() {
        errs.push("missing", &body, "Field required", &Value::Null);
        return Err(errs.render());
    }
    let req = match parsed {
        Ok(v) => v,
        Err(e) => {
            let loc = [Loc::from("body"), Loc::Index(json_error_pos(data, &e))];
            let ctx = format!(
                "{{'error': {}}}",
                py_repr(&Value::String(json_error_msg(&e)))
            );
            errs.push_ctx(
                "json_invalid",
                &loc,
                "JSON decode error",
                "{}".to_owned(),
                Some(ctx),
            );
            return Err(errs.render());
        }
    };
    let Some(obj) = req.as_object() else {
        errs.push(
            "model_attributes_type",
            &body,
            "Input should be a valid dictionary or object to extract fields from",
            &req,
        );
        return Err(errs.render());
    };
    // The request models' `mode="before"` validator runs ahead of the fields.
    if endpoint != Endpoint::Embeddings
        && obj.get("stream_options").is_some_and(truthy)
        && !obj.get("stream").is_some_and(truthy)
    {
        let ctx = format!(
            "{{'error': ValueError({})}}",
            py_repr_str(STREAM_OPTIONS_ERROR)
        );
        errs.push_ctx(
            "value_error",
            &body,
            &format!("Value error, {STREAM_OPTIONS_ERROR}"),
            py_repr(&req),
            Some(ctx),
        );
        return Err(errs.render());
    }
    // Fields in the order of vLLM's request models.
    match endpoint {
        Endpoint::Chat => {
            check_messages(obj, &req, &mut errs);
            optional(obj, "model", &mut errs, check_str);
            optional(obj, "max_tokens", &mut errs, check_int);
            optional(obj, "max_completion_tokens", &mut errs, check_int);
            optional(obj, "n", &mut errs, check_int);
            check_sampling_tail(obj, &mut errs);
        }
        Endpoint::Completions => {
            optional(obj, "model", &mut errs, check_str);
            required_prompt(obj, &req, "prompt", &mut errs);
            optional(obj, "max_tokens", &mut errs, check_int);
            optional(obj, "n", &mut errs, check_int);
            check_sampling_tail(obj, &mut errs);
        }
        Endpoint::Embeddings => {
            optional(obj, "model", &mut errs, check_str);
            required_prompt(obj, &req, "input", &mut errs);
            if let Some(v) = obj.get("encoding_format") {
                if !matches!(v.as_str(), Some("float" | "base64")) {
                    errs.push_ctx(
                        "literal_error",
                        &[Loc::from("body"), Loc::from("encoding_format")],
                        "Input should be 'float' or 'base64'",
                        py_repr(v),
                        Some("{'expected': \"'float' or 'base64'\"}".to_owned()),
                    );
                }
            }
            optional(obj, "dimensions", &mut errs, check_int);
        }
    }
    if errs.is_empty() {
        Ok(req)
    } else {
        Err(errs.render())
    }
}

/// Stage 2 (after the model check): the values vLLM refuses once the
/// request parsed. `Err` carries the 400's message.
pub fn check_values(endpoint: Endpoint, req: &Value) -> Result<(), String> {
    let get = |k: &str| req.get(k).filter(|v| !v.is_null());
    if endpoint == Endpoint::Embeddings {
        return Ok(());
    }
    if endpoint == Endpoint::Chat
        && get("messages")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    {
        return Err("`messages` must contain at least one message, got an empty list.".to_owned());
    }
    if let Some(n) = get("n").and_then(|v| lax_int(v).ok()) {
        if n < 1 {
            return Err(format!("n must be at least 1, got {n}."));
        }
    }
    if let Some(t) = get("temperature").and_then(|v| lax_float(v).ok()) {
        if t < 0.0 {
            return Err(format!(
                "temperature must be non-negative, got {}.",
                py_float(t)
            ));
        }
    }
    if let Some(p) = get("top_p").and_then(|v| lax_float(v).ok()) {
        if !(p > 0.0 && p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}.", py_float(p)));
        }
    }
    // Chat: `max_completion_tokens or max_tokens` (Python's `or`: 0 falls
    // through). Completions: `echo` with `max_tokens` 0 only echoes the prompt.
    let int = |k: &'static str| get(k).and_then(|v| lax_int(v).ok()).map(|n| (k, n));
    let max = match endpoint {
        Endpoint::Chat => int("max_completion_tokens")
            .filter(|(_, n)| *n != 0)
            .or_else(|| int("max_tokens")),
        _ => int("max_tokens").filter(|(_, n)| !(*n == 0 && get("echo").is_some_and(truthy))),
    };
    if let Some((field, n)) = max {
        if n < 1 {
            return Err(format!("{field} must be at least 1, got {n}."));
        }
    }
    Ok(())
}

/// `stream`, `stream_options`, `temperature`, `top_p` (chat and completions).
fn check_sampling_tail(obj: &Map<String, Value>, errs: &mut Errors) {
    optional(obj, "stream", errs, check_bool);
    if let Some(opts) = obj.get("stream_options").filter(|v| !v.is_null()) {
        let loc = [Loc::from("body"), Loc::from("stream_options")];
        match opts.as_object() {
            Some(o) => {
                for key in ["include_usage", "continuous_usage_stats"] {
                    if let Some(v) = o.get(key).filter(|v| !v.is_null()) {
                        check_bool(v, &at(&loc, key), errs);
                    }
                }
            }
            None => errs.push_ctx(
                "model_type",
                &loc,
                "Input should be a valid dictionary or instance of StreamOptions",
                py_repr(opts),
                Some("{'class_name': 'StreamOptions'}".to_owned()),
            ),
        }
    }
    optional(obj, "temperature", errs, check_float);
    optional(obj, "top_p", errs, check_float);
}

/// An `Optional[...]` field: absent or null passes, anything else is checked.
fn optional(
    obj: &Map<String, Value>,
    key: &str,
    errs: &mut Errors,
    check: fn(&Value, &[Loc], &mut Errors),
) {
    if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
        check(v, &[Loc::from("body"), Loc::from(key)], errs);
    }
}

fn check_str(v: &Value, loc: &[Loc], errs: &mut Errors) {
    if !v.is_string() {
        errs.push("string_type", loc, "Input should be a valid string", v);
    }
}

fn check_int(v: &Value, loc: &[Loc], errs: &mut Errors) {
    if let Err((kind, msg)) = lax_int(v) {
        errs.push(kind, loc, msg, v);
    }
}

fn check_float(v: &Value, loc: &[Loc], errs: &mut Errors) {
    if let Err((kind, msg)) = lax_float(v) {
        errs.push(kind, loc, msg, v);
    }
}

fn check_bool(v: &Value, loc: &[Loc], errs: &mut Errors) {
    if let Err((kind, msg)) = lax_bool(v) {
        errs.push(kind, loc, msg, v);
    }
}

/// Chat `messages`: required, a list of message dicts, each with a string
/// `role` and a `content` that is a string, a list of content parts (strings
/// or dicts), absent, or null for an assistant (or function) message.
fn check_messages(obj: &Map<String, Value>, req: &Value, errs: &mut Errors) {
    let loc = [Loc::from("body"), Loc::from("messages")];
    let Some(messages) = obj.get("messages") else {
        errs.push("missing", &loc, "Field required", req);
        return;
    };
    let Some(list) = messages.as_array() else {
        errs.push("list_type", &loc, "Input should be a valid list", messages);
        return;
    };
    for (i, m) in list.iter().enumerate() {
        let mloc = at(&loc, i);
        let Some(msg) = m.as_object() else {
            errs.push("dict_type", &mloc, "Input should be a valid dictionary", m);
            continue;
        };
        let role = match msg.get("role") {
            None => {
                errs.push("missing", &at(&mloc, "role"), "Field required", m);
                None
            }
            Some(Value::String(r)) => Some(r.as_str()),
            Some(other) => {
                check_str(other, &at(&mloc, "role"), errs);
                None
            }
        };
        let cloc = at(&mloc, "content");
        match msg.get("content") {
            None | Some(Value::String(_)) => {}
            Some(Value::Null) if matches!(role, Some("assistant" | "function")) => {}
            Some(Value::Array(parts)) => {
                let bad: Vec<(usize, &Value)> = parts
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !(p.is_string() || p.is_object()))
                    .collect();
                if !bad.is_empty() {
                    errs.push(
                        "string_type",
                        &at(&cloc, "str"),
                        "Input should be a valid string",
                        &msg["content"],
                    );
                    for (j, p) in bad {
                        errs.push(
                            "dict_type",
                            &at(&at(&cloc, PARTS_TAG), j),
                            "Input should be a valid dictionary",
                            p,
                        );
                    }
                }
            }
            Some(other) => {
                errs.push(
                    "string_type",
                    &at(&cloc, "str"),
                    "Input should be a valid string",
                    other,
                );
                errs.push(
                    "list_type",
                    &at(&cloc, PARTS_TAG),
                    "Input should be a valid list",
                    other,
                );
            }
        }
    }
}

/// One shape a `prompt` / `input` may take (pydantic's lax mode).
#[derive(Clone, Copy)]
enum Shape {
    Str,
    Int,
    List(&'static Shape),
}

const PROMPT_SHAPES: [(&str, Shape); 4] = [
    ("list[int]", Shape::List(&Shape::Int)),
    ("list[list[int]]", Shape::List(&Shape::List(&Shape::Int))),
    ("str", Shape::Str),
    ("list[str]", Shape::List(&Shape::Str)),
];

fn check_shape_of(v: &Value, shape: Shape, loc: &[Loc], errs: &mut Errors) {
    match shape {
        Shape::Str => check_str(v, loc, errs),
        Shape::Int => check_int(v, loc, errs),
        Shape::List(inner) => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_shape_of(item, *inner, &at(loc, i), errs);
                }
            }
            None => errs.push("list_type", loc, "Input should be a valid list", v),
        },
    }
}

/// `prompt` (completions) / `input` (embeddings): required,
/// `Union[list[int], list[list[int]], str, list[str]]`. When no member fits,
/// every member's errors are listed under its tag, as pydantic does.
fn required_prompt(obj: &Map<String, Value>, req: &Value, key: &str, errs: &mut Errors) {
    let loc = [Loc::from("body"), Loc::from(key)];
    let Some(v) = obj.get(key) else {
        errs.push("missing", &loc, "Field required", req);
        return;
    };
    let mut all = Errors::default();
    for (tag, shape) in PROMPT_SHAPES {
        let mut one = Errors::default();
        check_shape_of(v, shape, &at(&loc, tag), &mut one);
        if one.is_empty() {
            return;
        }
        all.0.extend(one.0);
    }
    for e in all.0 {
        if errs.0.len() < MAX_ERRORS {
            errs.0.push(e);
        }
    }
}

type LaxError = (&'static str, &'static str);

/// Pydantic's lax `int`: integers, floats without a fraction, booleans and
/// numeric strings.
pub fn lax_int(v: &Value) -> Result<i128, LaxError> {
    const PARSING: LaxError = (
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    );
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e38 {
                    Ok(f as i128)
                } else {
                    Err((
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                    ))
                }
            }
        }
        Value::Bool(b) => Ok(i128::from(*b)),
        Value::String(s) => s.trim().parse::<i128>().map_err(|_| PARSING),
        _ => Err(("int_type", "Input should be a valid integer")),
    }
}

/// Pydantic's lax `float`: numbers, booleans and numeric strings.
pub fn lax_float(v: &Value) -> Result<f64, LaxError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or(("float_type", "Input should be a valid number")),
        Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
        Value::String(s) => s.trim().parse::<f64>().map_err(|_| {
            (
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )
        }),
        _ => Err(("float_type", "Input should be a valid number")),
    }
}

/// Pydantic's lax `bool`: booleans, 0/1, and the strings it knows.
pub fn lax_bool(v: &Value) -> Result<bool, LaxError> {
    const PARSING: LaxError = (
        "bool_parsing",
        "Input should be a valid boolean, unable to interpret input",
    );
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => {
            let f = n.as_f64();
            if f == Some(0.0) {
                Ok(false)
            } else if f == Some(1.0) {
                Ok(true)
            } else {
                Err(PARSING)
            }
        }
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(PARSING),
        },
        _ => Err(("bool_type", "Input should be a valid boolean")),
    }
}

/// Python truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Byte offset of a JSON syntax error (Python's `JSONDecodeError.pos`).
fn json_error_pos(data: &[u8], e: &serde_json::Error) -> usize {
    let line_start: usize = data
        .split(|b| *b == b'\n')
        .take(e.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (line_start + e.column().saturating_sub(1)).min(data.len())
}

/// Python's `json` message for a syntax error (serde_json's own wording
/// where there is no close match).
fn json_error_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let s = match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => s.as_str(),
    };
    match s {
        "expected value" | "EOF while parsing a value" => "Expecting value",
        "key must be a string" | "EOF while parsing an object" => {
            "Expecting property name enclosed in double quotes"
        }
        "expected `:`" => "Expecting ':' delimiter",
        "expected `,` or `}`" | "expected `,` or `]`" | "EOF while parsing a list" => {
            "Expecting ',' delimiter"
        }
        "trailing characters" => "Extra data",
        "EOF while parsing a string" => "Unterminated string starting at",
        other => other,
    }
    .to_owned()
}

/// Python's `repr()` of a float.
fn py_float(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn py_repr_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    py_str(s, &mut out);
    out
}

/// Python's `repr()` of a str: single quotes unless it holds `'` and no `"`.
fn py_str(s: &str, out: &mut String) {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(q);
}

/// Python's `repr()` of the value `json.loads` gives, cut after
/// [`MAX_INPUT_REPR`] characters (object keys come sorted, where Python
/// keeps the body's order: serde_json's map here is a `BTreeMap`).
fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    py_value(v, &mut out);
    if out.len() > MAX_INPUT_REPR {
        let mut cut = MAX_INPUT_REPR;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

fn py_value(v: &Value, out: &mut String) {
    if out.len() > MAX_INPUT_REPR {
        return;
    }
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => {
                let _ = write!(out, "{i}");
            }
            (_, Some(u), _) => {
                let _ = write!(out, "{u}");
            }
            (_, _, Some(f)) => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => {
            // Only what can still show: a huge prompt is cut anyway.
            let end = s
                .char_indices()
                .nth(MAX_INPUT_REPR)
                .map_or(s.len(), |(i, _)| i);
            py_str(&s[..end], out);
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_value(item, out);
                if out.len() > MAX_INPUT_REPR {
                    break;
                }
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_str(k, out);
                out.push_str(": ");
                py_value(item, out);
                if out.len() > MAX_INPUT_REPR {
                    break;
                }
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(ep: Endpoint, body: &str) -> Result<Value, String> {
        check_shape(ep, body.as_bytes(), serde_json::from_str(body))
    }

    #[test]
    fn valid_requests_pass() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"},"x"]}],"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[]},{"role":"user"}],"max_tokens":"5","temperature":0,"top_p":1,"n":1.0}"#,
            r#"{"model":"m","messages":[],"stream_options":{}}"#,
        ] {
            assert!(shape(Endpoint::Chat, body).is_ok(), "{body}");
        }
        for prompt in [
            json!("x"),
            json!(["a", "b"]),
            json!([1, 2]),
            json!([[1], [2, 3]]),
            json!([]),
        ] {
            let body = json!({"model": "m", "prompt": prompt}).to_string();
            assert!(shape(Endpoint::Completions, &body).is_ok(), "{body}");
            let body = json!({"model": "m", "input": prompt}).to_string();
            assert!(shape(Endpoint::Embeddings, &body).is_ok(), "{body}");
        }
    }

    #[test]
    fn pydantic_messages_are_rendered_as_python_prints_them() {
        let e = shape(Endpoint::Chat, r#"{"model":"m","message":[]}"#).unwrap_err();
        assert_eq!(
            e,
            "[{'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required', 'input': {'message': [], 'model': 'm'}}]"
        );
        let e = shape(Endpoint::Chat, r#"{"model":"m","messages":"hi"}"#).unwrap_err();
        assert_eq!(
            e,
            "[{'type': 'list_type', 'loc': ('body', 'messages'), 'msg': 'Input should be a valid list', 'input': 'hi'}]"
        );
        let e = shape(Endpoint::Chat, "[1,2]").unwrap_err();
        assert!(e.contains("'loc': ('body',)"), "{e}");
        let e = shape(Endpoint::Chat, "").unwrap_err();
        assert_eq!(
            e,
            "[{'type': 'missing', 'loc': ('body',), 'msg': 'Field required', 'input': None}]"
        );
        let e = shape(Endpoint::Chat, r#"{"model": }"#).unwrap_err();
        assert!(
            e.starts_with("[{'type': 'json_invalid', 'loc': ('body', 10)"),
            "{e}"
        );
        let e = shape(
            Endpoint::Completions,
            r#"{"prompt":"x","stream_options":{"include_usage":true}}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("Stream options can only be defined when `stream=True`."),
            "{e}"
        );
        let e = shape(
            Endpoint::Embeddings,
            r#"{"input":"x","encoding_format":"hex"}"#,
        )
        .unwrap_err();
        assert!(
            e.contains(r#"'msg': "Input should be 'float' or 'base64'""#),
            "{e}"
        );
    }

    #[test]
    fn mistyped_fields_are_named() {
        let cases: &[(Endpoint, &str, &str)] = &[
            (
                Endpoint::Chat,
                r#"{"messages":[1]}"#,
                "('body', 'messages', 0)",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"content":"x"}]}"#,
                "('body', 'messages', 0, 'role')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":1,"content":"x"}]}"#,
                "('body', 'messages', 0, 'role')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":null}]}"#,
                "('body', 'messages', 0, 'content', 'str')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":[1]}]}"#,
                "'content', 'list[ChatCompletionContentPartParam]', 0)",
            ),
            (
                Endpoint::Chat,
                r#"{"model":5,"messages":[]}"#,
                "('body', 'model')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[],"max_tokens":1.5}"#,
                "int_from_float",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[],"max_completion_tokens":"x"}"#,
                "('body', 'max_completion_tokens')",
            ),
            (Endpoint::Chat, r#"{"messages":[],"n":[]}"#, "('body', 'n')"),
            (
                Endpoint::Chat,
                r#"{"messages":[],"stream":"maybe"}"#,
                "('body', 'stream')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[],"stream":true,"stream_options":5}"#,
                "('body', 'stream_options')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[],"temperature":"hot"}"#,
                "('body', 'temperature')",
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[],"top_p":{}}"#,
                "('body', 'top_p')",
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m"}"#,
                "('body', 'prompt')",
            ),
            (
                Endpoint::Completions,
                r#"{"prompt":5}"#,
                "('body', 'prompt', 'str')",
            ),
            (
                Endpoint::Completions,
                r#"{"prompt":["a",1]}"#,
                "('body', 'prompt', 'list[str]', 1)",
            ),
            (
                Endpoint::Embeddings,
                r#"{"model":"m"}"#,
                "('body', 'input')",
            ),
            (
                Endpoint::Embeddings,
                r#"{"input":{"a":1}}"#,
                "('body', 'input', 'list[int]')",
            ),
        ];
        for (ep, body, want) in cases {
            let e = shape(*ep, body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn values_are_checked_like_sampling_params() {
        let check = |ep, v: Value| check_values(ep, &v);
        let chat = |extra: Value| {
            let mut v = json!({"messages": [{"role": "user", "content": "x"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        assert!(check(Endpoint::Chat, chat(json!({}))).is_ok());
        assert_eq!(
            check(Endpoint::Chat, json!({"messages": []})).unwrap_err(),
            "`messages` must contain at least one message, got an empty list."
        );
        assert_eq!(
            check(Endpoint::Chat, chat(json!({"max_tokens": -1}))).unwrap_err(),
            "max_tokens must be at least 1, got -1."
        );
        assert_eq!(
            check(
                Endpoint::Chat,
                chat(json!({"max_completion_tokens": -3, "max_tokens": 5}))
            )
            .unwrap_err(),
            "max_completion_tokens must be at least 1, got -3."
        );
        assert!(check(
            Endpoint::Chat,
            chat(json!({"max_completion_tokens": 0, "max_tokens": 5}))
        )
        .is_ok());
        assert_eq!(
            check(Endpoint::Chat, chat(json!({"temperature": -1}))).unwrap_err(),
            "temperature must be non-negative, got -1.0."
        );
        assert_eq!(
            check(Endpoint::Chat, chat(json!({"top_p": 0}))).unwrap_err(),
            "top_p must be in (0, 1], got 0.0."
        );
        assert_eq!(
            check(Endpoint::Chat, chat(json!({"n": 0}))).unwrap_err(),
            "n must be at least 1, got 0."
        );
        assert!(check(
            Endpoint::Completions,
            json!({"prompt": "x", "max_tokens": 0, "echo": true})
        )
        .is_ok());
        assert!(check(
            Endpoint::Completions,
            json!({"prompt": "x", "max_tokens": 0})
        )
        .is_err());
        assert!(check(
            Endpoint::Embeddings,
            json!({"input": "x", "max_tokens": -1})
        )
        .is_ok());
    }

    #[test]
    fn python_reprs() {
        assert_eq!(
            py_repr(&json!({"a": [1, 2.5, true, null, "it's"]})),
            r#"{'a': [1, 2.5, True, None, "it's"]}"#
        );
        assert_eq!(py_repr(&json!("a\n'\"")), r#"'a\n\'"'"#);
        assert_eq!(py_float(1.0), "1.0");
        let big = py_repr(&json!("x".repeat(10_000)));
        assert!(big.len() < MAX_INPUT_REPR + 8 && big.ends_with("..."));
    }
}
