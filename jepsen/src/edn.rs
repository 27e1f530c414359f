//! The subset of EDN that Jepsen histories use: maps, vectors, lists, sets, keywords, strings,
//! integers, floats, booleans and nil. Keywords become strings without their colon.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Number, Value};

pub fn write(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        Value::Array(items) => format!("[{}]", items.iter().map(write).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => {
            format!("{{{}}}", m.iter().map(|(k, v)| format!(":{} {}", k, write(v))).collect::<Vec<_>>().join(", "))
        }
    }
}

pub fn parse_all(text: &str) -> Result<Vec<Value>> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let mut out = Vec::new();
    loop {
        p.skip();
        if p.i >= p.s.len() {
            return Ok(out);
        }
        out.push(p.value()?);
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b' ' | b'\t' | b'\n' | b'\r' | b',' => self.i += 1,
                b';' => {
                    while self.i < self.s.len() && self.s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn err(&self, what: &str) -> anyhow::Error {
        let line = self.s[..self.i.min(self.s.len())].iter().filter(|b| **b == b'\n').count() + 1;
        anyhow!("EDN line {line}: {what}")
    }

    fn value(&mut self) -> Result<Value> {
        self.skip();
        let Some(&c) = self.s.get(self.i) else { return Err(self.err("unexpected end")) };
        match c {
            b'{' => {
                self.i += 1;
                let mut m = Map::new();
                loop {
                    self.skip();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Value::Object(m));
                    }
                    let k = match self.value()? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    let v = self.value()?;
                    m.insert(k, v);
                }
            }
            b'[' | b'(' => {
                let close = if c == b'[' { b']' } else { b')' };
                self.i += 1;
                self.seq(close)
            }
            b'#' if self.s.get(self.i + 1) == Some(&b'{') => {
                self.i += 2;
                self.seq(b'}')
            }
            b'"' => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len() && self.s[self.i] != b'"' {
                    if self.s[self.i] == b'\\' {
                        self.i += 1;
                    }
                    self.i += 1;
                }
                self.i += 1;
                let raw = std::str::from_utf8(&self.s[start..self.i.min(self.s.len())])?;
                serde_json::from_str(raw).map_err(|_| self.err("bad string"))
            }
            b':' => {
                self.i += 1;
                Ok(Value::String(self.token()))
            }
            _ => {
                let t = self.token();
                match t.as_str() {
                    "" => Err(self.err(&format!("unexpected {:?}", c as char))),
                    "nil" => Ok(Value::Null),
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    _ => {
                        let t = t.trim_end_matches('N').trim_end_matches('M');
                        if let Ok(n) = t.parse::<i64>() {
                            Ok(Value::Number(n.into()))
                        } else if let Some(n) = t.parse::<f64>().ok().and_then(Number::from_f64) {
                            Ok(Value::Number(n))
                        } else {
                            // A symbol: kept as text.
                            Ok(Value::String(t.to_string()))
                        }
                    }
                }
            }
        }
    }

    fn seq(&mut self, close: u8) -> Result<Value> {
        let mut items = Vec::new();
        loop {
            self.skip();
            match self.s.get(self.i) {
                Some(&b) if b == close => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                None => bail!(self.err("unclosed collection")),
                _ => items.push(self.value()?),
            }
        }
    }

    fn token(&mut self) -> String {
        let start = self.i;
        while self.i < self.s.len() && !b" \t\n\r,{}[]()\"".contains(&self.s[self.i]) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
}
