//! EDN as Jepsen histories contain it, read into JSON values (the checkers' common currency):
//!
//! - `nil` → null; `true`/`false`; strings (with EDN's escapes, literal newlines allowed);
//! - integers, with or without `N`, → numbers (beyond 64 bits: the digits, as a string);
//!   decimals (`1.5M`) and floats → numbers (`##Inf`, `##-Inf`, `##NaN` → those strings);
//!   ratios (`1/3`) → the string `"1/3"` (Clojure prints them reduced, so equal ratios read equal);
//! - keywords → strings without the colon, namespace kept (`:jepsen.nemesis/foo` →
//!   `"jepsen.nemesis/foo"`); symbols → strings; characters (`\c`, `\newline`, `\u00e9`) → one-char strings;
//! - vectors and lists → arrays; sets → arrays sorted by their canonical text (a set has no order,
//!   so two prints of the same set read the same);
//! - maps → objects; a key that is not a keyword, symbol or string is keyed by its EDN text;
//!   `#:ns{:a 1}` (a namespaced map) → `{"ns/a": 1}`;
//! - `#_ form` is discarded; any other tagged literal `#tag form` reads as `form`
//!   (`#jepsen.history.Op{...}` → the map, `#inst "..."` and `#uuid "..."` → the string).
//!
//! So keywords and strings read alike (`:ok` and `"ok"`): Jepsen's histories do not rely on the
//! difference.

use anyhow::{anyhow, Result};
use serde_json::{Map, Number, Value};

/// Writes `v` as EDN (object keys as keywords when they can be).
pub fn write(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Array(items) => format!("[{}]", items.iter().map(write).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter().map(|(k, v)| format!("{} {}", write_key(k), write(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A map key: `:k` when `k` reads back as that keyword, else a string.
fn write_key(k: &str) -> String {
    let keyword_safe = k.chars().next().is_some_and(|c| !c.is_ascii_digit() && c != ':' && c != '#')
        && k.chars().all(|c| c.is_alphanumeric() || "-_.*+!?/<>=&$%'".contains(c));
    if keyword_safe {
        format!(":{k}")
    } else {
        serde_json::to_string(k).unwrap_or_default()
    }
}

/// A text that is equal for equal values and different for different ones (object keys sorted
/// whatever serde_json's map order): what values are interned and compared by.
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap_or_default(), canonical(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// Every top-level form of `text`.
pub fn parse_all(text: &str) -> Result<Vec<Value>> {
    let mut p = Parser { t: text, s: text.as_bytes(), i: 0 };
    let mut out = Vec::new();
    loop {
        p.skip()?;
        if p.i >= p.s.len() {
            return Ok(out);
        }
        out.push(p.value()?);
    }
}

struct Parser<'a> {
    t: &'a str,
    s: &'a [u8],
    i: usize,
}

/// Bytes that end a token (a number, symbol, keyword or tag).
const DELIMITERS: &[u8] = b" \t\n\r,{}[]()\";";

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Skips whitespace (commas included), `;` comments and `#_` discarded forms.
    fn skip(&mut self) -> Result<()> {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\n' | b'\r' | b',' => self.i += 1,
                b';' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                b'#' if self.s.get(self.i + 1) == Some(&b'_') => {
                    self.i += 2;
                    self.value().map_err(|e| e.context(self.err("in a #_ discarded form")))?;
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn err(&self, what: &str) -> anyhow::Error {
        let line = self.s[..self.i.min(self.s.len())].iter().filter(|b| **b == b'\n').count() + 1;
        anyhow!("EDN line {line}: {what}")
    }

    fn value(&mut self) -> Result<Value> {
        self.skip()?;
        let Some(c) = self.peek() else { return Err(self.err("unexpected end")) };
        match c {
            b'{' => {
                self.i += 1;
                self.map("")
            }
            b'[' | b'(' => {
                self.i += 1;
                self.items(if c == b'[' { b']' } else { b')' }).map(Value::Array)
            }
            b'#' => self.dispatch(),
            b'"' => self.string(),
            b'\\' => self.character(),
            b':' => {
                self.i += 1;
                let t = self.token();
                if t.is_empty() {
                    return Err(self.err("an empty keyword"));
                }
                Ok(Value::String(t.trim_start_matches(':').to_string()))
            }
            b']' | b')' | b'}' => Err(self.err(&format!("unexpected {:?}", c as char))),
            _ => {
                let t = self.token();
                match t.as_str() {
                    "" => Err(self.err(&format!("unexpected {:?}", c as char))),
                    "nil" => Ok(Value::Null),
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    _ if starts_number(&t) => number(&t).ok_or_else(|| self.err(&format!("bad number {t:?}"))),
                    // A symbol: kept as text.
                    _ => Ok(Value::String(t)),
                }
            }
        }
    }

    /// After `#`: a set, a namespaced map, a symbolic value (`##Inf`) or a tagged literal.
    fn dispatch(&mut self) -> Result<Value> {
        self.i += 1;
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut items = self.items(b'}')?;
                items.sort_by_cached_key(canonical);
                items.dedup();
                Ok(Value::Array(items))
            }
            Some(b'#') => {
                self.i += 1;
                let t = self.token();
                Ok(Value::String(format!("##{t}")))
            }
            Some(b':') => {
                self.i += 1;
                let ns = self.token();
                self.skip()?;
                if self.peek() != Some(b'{') {
                    return Err(self.err(&format!("#:{ns} is not followed by a map")));
                }
                self.i += 1;
                self.map(&ns)
            }
            _ => {
                let tag = self.token();
                if tag.is_empty() {
                    return Err(self.err("a # with no tag"));
                }
                self.value().map_err(|e| e.context(self.err(&format!("in the tagged literal #{tag}"))))
            }
        }
    }

    /// The rest of a map after `{`; `ns` prefixes keyword keys without a namespace (`#:ns{...}`).
    fn map(&mut self, ns: &str) -> Result<Value> {
        let mut m = Map::new();
        loop {
            self.skip()?;
            match self.peek() {
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Value::Object(m));
                }
                None => return Err(self.err("unclosed map")),
                _ => {}
            }
            let k = match self.value()? {
                Value::String(s) if ns.is_empty() => s,
                // In `#:ns{...}`, `:a` is `:ns/a`, `:other/b` stays, and `:_/c` is `:c`.
                Value::String(s) => match s.strip_prefix("_/") {
                    Some(bare) => bare.to_string(),
                    None if s.contains('/') => s,
                    None => format!("{ns}/{s}"),
                },
                other => write(&other),
            };
            self.skip()?;
            if self.peek() == Some(b'}') {
                return Err(self.err(&format!("map key {k:?} has no value")));
            }
            let v = self.value()?;
            m.insert(k, v);
        }
    }

    fn items(&mut self, close: u8) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        loop {
            self.skip()?;
            match self.peek() {
                Some(b) if b == close => {
                    self.i += 1;
                    return Ok(items);
                }
                None => return Err(self.err("unclosed collection")),
                _ => items.push(self.value()?),
            }
        }
    }

    fn string(&mut self) -> Result<Value> {
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else { return Err(self.err("unclosed string")) };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else { return Err(self.err("unclosed string")) };
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'u' => self.hex4()?,
                        other => return Err(self.err(&format!("bad string escape \\{}", other as char))),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map(Value::String).map_err(|_| self.err("a string that is not UTF-8"))
    }

    /// The four hex digits of `\uXXXX`, as a char.
    fn hex4(&mut self) -> Result<char> {
        let digits = self.s.get(self.i..self.i + 4).ok_or_else(|| self.err("short \\u escape"))?;
        let code = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or_else(|| self.err("bad \\u escape"))?;
        self.i += 4;
        // A lone surrogate cannot be a char: read as the replacement character.
        Ok(char::from_u32(code).unwrap_or('\u{fffd}'))
    }

    /// `\c`, `\newline`, `\space`, `\tab`, `\return`, `\formfeed`, `\backspace`, `\uXXXX`, `\oNNN`.
    fn character(&mut self) -> Result<Value> {
        self.i += 1;
        // `i` is just past an ASCII backslash, so at a char boundary of the text.
        let rest = self.t.get(self.i..).ok_or_else(|| self.err("a character that is not UTF-8"))?;
        let Some(first) = rest.chars().next() else { return Err(self.err("a \\ at the end")) };
        // The character itself, then any letters or digits that make it a name.
        let len = first.len_utf8() + rest[first.len_utf8()..].bytes().take_while(|b| b.is_ascii_alphanumeric()).count();
        let name = &rest[..len];
        self.i += len;
        let c = match name {
            "newline" => '\n',
            "space" => ' ',
            "tab" => '\t',
            "return" => '\r',
            "formfeed" => '\u{c}',
            "backspace" => '\u{8}',
            _ if name.chars().count() == 1 => first,
            _ if name.starts_with('u') && name.len() == 5 => u32::from_str_radix(&name[1..], 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| self.err(&format!("bad character \\{name}")))?,
            _ if name.starts_with('o') && name.len() <= 4 => u32::from_str_radix(&name[1..], 8)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| self.err(&format!("bad character \\{name}")))?,
            _ => return Err(self.err(&format!("bad character \\{name}"))),
        };
        Ok(Value::String(c.to_string()))
    }

    fn token(&mut self) -> String {
        let start = self.i;
        while self.peek().is_some_and(|c| !DELIMITERS.contains(&c)) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
}

fn starts_number(t: &str) -> bool {
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    digits.starts_with(|c: char| c.is_ascii_digit())
}

/// An integer (`12`, `-3`, `123N`, `0x1F`), a float or decimal (`1.5`, `1e3`, `1.5M`) or a ratio (`1/3`).
fn number(t: &str) -> Option<Value> {
    if let Some((n, d)) = t.split_once('/') {
        let ok = |s: &str| {
            let s = s.strip_prefix(['+', '-']).unwrap_or(s);
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
        };
        return (ok(n) && ok(d) && !d.starts_with(['+', '-'])).then(|| Value::String(t.trim_start_matches('+').into()));
    }
    let (negative, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let sign = if negative { "-" } else { "" };
    let int = body.strip_suffix('N').unwrap_or(body);
    if let Some(hex) = int.strip_prefix("0x").or_else(|| int.strip_prefix("0X")) {
        let n = i128::from_str_radix(hex, 16).ok()?;
        return int_value(if negative { -n } else { n }, &format!("{sign}{n}"));
    }
    if !int.is_empty() && int.bytes().all(|b| b.is_ascii_digit()) {
        return match format!("{sign}{int}").parse::<i128>() {
            Ok(n) => int_value(n, &format!("{sign}{int}")),
            Err(_) => Some(Value::String(format!("{sign}{}", int.trim_start_matches('0')))),
        };
    }
    let float = body.strip_suffix('M').unwrap_or(body);
    if !float.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) {
        return None;
    }
    let f: f64 = format!("{sign}{float}").parse().ok()?;
    Some(Number::from_f64(f).map_or_else(|| Value::String(format!("{sign}{float}")), Value::Number))
}

/// A number when it fits 64 bits, else its decimal text.
fn int_value(n: i128, text: &str) -> Option<Value> {
    if let Ok(i) = i64::try_from(n) {
        Some(Value::Number(i.into()))
    } else if let Ok(u) = u64::try_from(n) {
        Some(Value::Number(u.into()))
    } else {
        Some(Value::String(text.trim_start_matches('+').to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Value {
        let mut all = parse_all(text).unwrap_or_else(|e| panic!("{text}: {e:#}"));
        assert_eq!(all.len(), 1, "{text}");
        all.remove(0)
    }

    #[test]
    fn reads_what_jepsen_writes() {
        assert_eq!(
            one("#jepsen.history.Op{:index 0, :time 1, :type :invoke, :process 0, :f :read, :value nil}"),
            json!({"index": 0, "time": 1, "type": "invoke", "process": 0, "f": "read", "value": null})
        );
        assert_eq!(one(":jepsen.nemesis/foo"), json!("jepsen.nemesis/foo"));
        assert_eq!(one(r"[\c \newline \space \u00e9 \(]"), json!(["c", "\n", " ", "é", "("]));
        assert_eq!(
            one("[1/3 -2/4 123N 1.5M 1e3 -7 +8 0x1F 99999999999999999999N]"),
            json!(["1/3", "-2/4", 123, 1.5, 1000.0, -7, 8, 31, "99999999999999999999"])
        );
        assert_eq!(one("#{3 1 2}"), one("#{2 3 1}"));
        assert_eq!(one("#{3 1 2}"), json!([1, 2, 3]));
        assert_eq!(one("[1 #_ 2 #_#_ 3 4 5 #_ {:a 1}]"), json!([1, 5]));
        assert_eq!(one("{:a #_ :b 1}"), json!({"a": 1}));
        assert_eq!(one("[foo bar/baz + ->x]"), json!(["foo", "bar/baz", "+", "->x"]));
        assert_eq!(one("{1 :a, [1 2] :b, nil :c}"), json!({"1": "a", "[1 2]": "b", "nil": "c"}));
        assert_eq!(one("{:value {:x [1 {:y nil}]}}"), json!({"value": {"x": [1, {"y": null}]}}));
        assert_eq!(
            one(r#"[#inst "2024-01-01T00:00:00.000-00:00" #uuid "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"]"#),
            json!(["2024-01-01T00:00:00.000-00:00", "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"])
        );
        assert_eq!(one("#:jepsen{:a 1, :other/b 2}"), json!({"jepsen/a": 1, "other/b": 2}));
        assert_eq!(one("[##Inf ##NaN]"), json!(["##Inf", "##NaN"]));
        assert_eq!(one("\"a\\\"b\\n\\u0041\nc\""), json!("a\"b\nA\nc"));
        assert_eq!(one("(1 ; a comment\n 2)"), json!([1, 2]));
        assert_eq!(parse_all("{:a 1}\n{:b 2}\n").unwrap().len(), 2);
    }

    #[test]
    fn bad_input_is_an_error_with_its_line() {
        for bad in ["[1 2", "{:a}", "\"abc", "12abc", "#", ")", "{:a 1", "\\"] {
            let e = parse_all(&format!("\n{bad}")).expect_err(bad);
            assert!(format!("{e:#}").contains("EDN line 2"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn write_reads_back() {
        let v = json!({"a": [1, null, "x y", {"weird key": true, "k/ns": -1.5}], "b": 3});
        assert_eq!(one(&write(&v)), v);
        assert_eq!(canonical(&json!({"b": 1, "a": [2]})), r#"{"a":[2],"b":1}"#);
    }
}
