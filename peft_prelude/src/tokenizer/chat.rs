//! Rendering Hugging Face chat templates with minijinja.
//!
//! `transformers` renders templates with Jinja2 (`trim_blocks`, `lstrip_blocks`), the
//! variables `messages`, `add_generation_prompt`, `tools`, `documents` and the special
//! tokens, plus the functions `raise_exception` and `strftime_now`. Templates also call
//! Python methods on values (`content.strip()`, `message.get('x')`); the common ones are
//! provided here through minijinja's unknown-method hook. `tojson` is Python's
//! `json.dumps` (`", "` / `": "` separators, no HTML escaping), not minijinja's own.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

use super::ChatMessage;
use crate::error::{Error, Result};

pub(super) struct Context<'a> {
    pub messages: &'a [ChatMessage],
    pub add_generation_prompt: bool,
    pub bos_token: Option<&'a str>,
    pub eos_token: Option<&'a str>,
    pub extra: &'a serde_json::Map<String, serde_json::Value>,
}

pub(super) fn render(template: &str, ctx: &Context<'_>) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.set_unknown_method_callback(python_method);
    let template = env
        .template_from_named_str("chat_template", template)
        .map_err(template_error)?;

    let mut vars = serde_json::Map::new();
    let messages = serde_json::to_value(ctx.messages)
        .map_err(|e| Error::ChatTemplate(format!("cannot serialise the messages: {e}")))?;
    vars.insert("messages".into(), messages);
    vars.insert(
        "add_generation_prompt".into(),
        ctx.add_generation_prompt.into(),
    );
    // transformers passes these as None, so `tools is not none` is false.
    vars.insert("tools".into(), serde_json::Value::Null);
    vars.insert("documents".into(), serde_json::Value::Null);
    // An unset special token stays undefined (renders as "") rather than "none".
    if let Some(bos) = ctx.bos_token {
        vars.insert("bos_token".into(), bos.into());
    }
    if let Some(eos) = ctx.eos_token {
        vars.insert("eos_token".into(), eos.into());
    }
    for (key, value) in ctx.extra {
        vars.insert(key.clone(), value.clone());
    }
    template
        .render(Value::from_serialize(&vars))
        .map_err(template_error)
}

fn template_error(e: minijinja::Error) -> Error {
    Error::ChatTemplate(e.to_string())
}

/// `raise_exception("...")`: how templates reject a conversation (e.g. wrong role order).
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised an exception: {message}"),
    ))
}

/// `transformers`' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, with the same keyword arguments (`indent` may also
/// be passed positionally, as in Jinja2).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> MethodResult {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match (v.as_i64(), v.as_str()) {
            (Some(n), _) => " ".repeat(usize::try_from(n).unwrap_or(0)),
            (None, Some(s)) => s.to_owned(),
            _ => return Err(bad_args("tojson", "an integer or string `indent`")),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) => match <[String; 2]>::try_from(seps) {
            Ok([item, key]) => (item, key),
            Err(_) => return Err(bad_args("tojson", "`separators` = (item, key)")),
        },
        // Python drops the space after "," when indenting.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    if !ensure_ascii {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let number = serde_json::to_value(value).map_err(|e| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
            })?;
            match number.as_f64() {
                // Python writes floats with a fractional part (`1.0`), ints without.
                Some(f) if number.is_f64() && f.is_finite() => out.push_str(&format!("{f:?}")),
                Some(f) if number.is_f64() => out.push_str(if f.is_nan() {
                    "NaN"
                } else if f > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                }),
                _ => out.push_str(&number.to_string()),
            }
        }
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(k) => write_json_string(out, k, style.ensure_ascii),
                    None => write_json_string(out, &key.to_string(), style.ensure_ascii),
                }
                out.push_str(&style.key_sep);
                write_json(out, &value.get_item(key)?, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => write_json_string(out, &value.to_string(), style.ensure_ascii),
    }
    Ok(())
}

/// `strftime_now(format)` in UTC (at `SOURCE_DATE_EPOCH` when set), with the common
/// `strftime` directives.
fn strftime_now(format: String) -> String {
    // `SOURCE_DATE_EPOCH` (the reproducible-builds convention) pins "now": renderings, and
    // the tests against transformers' at a fixed instant, do not change with the day.
    let pinned = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let secs = pinned.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    strftime(&format, secs)
}

fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday (index 3).
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // `%-d` (glibc: no padding).
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let num = |n: u64| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:02}")
            }
        };
        match spec {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&num(month as u64)),
            Some('d') => out.push_str(&num(day as u64)),
            Some('H') => out.push_str(&num(hour)),
            Some('I') => out.push_str(&num((hour + 11) % 12 + 1)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&num(minute)),
            Some('S') => out.push_str(&num(second)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

type MethodResult = std::result::Result<Value, minijinja::Error>;

/// The Python `str` and `dict` methods chat templates use.
fn python_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> MethodResult {
    match value.kind() {
        ValueKind::String => string_method(value.as_str().unwrap_or_default(), method, args),
        ValueKind::Map => map_method(value, method, args),
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

fn bad_args(method: &str, expected: &str) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("`{method}` expects {expected}"),
    )
}

/// Argument `i` as a string; `None` when absent or none.
fn str_arg<'v>(
    args: &'v [Value],
    i: usize,
    method: &str,
) -> std::result::Result<Option<&'v str>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| bad_args(method, "string arguments")),
    }
}

fn int_arg(
    args: &[Value],
    i: usize,
    method: &str,
) -> std::result::Result<Option<i64>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| bad_args(method, "an integer argument")),
    }
}

fn string_method(s: &str, method: &str, args: &[Value]) -> MethodResult {
    let arity = |max: usize| {
        if args.len() > max {
            Err(bad_args(method, &format!("at most {max} argument(s)")))
        } else {
            Ok(())
        }
    };
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            arity(1)?;
            // Python strips whitespace by default, else any of the given characters.
            let set: Option<Vec<char>> = str_arg(args, 0, method)?.map(|set| set.chars().collect());
            let pattern = |c: char| {
                set.as_ref()
                    .map_or(c.is_whitespace(), |set| set.contains(&c))
            };
            let out = match method {
                "strip" => s.trim_matches(pattern),
                "lstrip" => s.trim_start_matches(pattern),
                _ => s.trim_end_matches(pattern),
            };
            Value::from(out)
        }
        "startswith" | "endswith" => {
            arity(1)?;
            let arg = args.first().ok_or_else(|| bad_args(method, "a prefix"))?;
            // A string or a tuple (list) of strings.
            let candidates: Vec<Value> = if arg.kind() == ValueKind::String {
                vec![arg.clone()]
            } else {
                arg.try_iter()
                    .map_err(|_| bad_args(method, "a string or a tuple of strings"))?
                    .collect()
            };
            let mut hit = false;
            for c in &candidates {
                let c = c
                    .as_str()
                    .ok_or_else(|| bad_args(method, "a string or a tuple of strings"))?;
                hit |= if method == "startswith" {
                    s.starts_with(c)
                } else {
                    s.ends_with(c)
                };
            }
            Value::from(hit)
        }
        "split" | "rsplit" => {
            arity(2)?;
            let sep = str_arg(args, 0, method)?;
            let max = int_arg(args, 1, method)?
                .filter(|&m| m >= 0)
                .map(|m| m as usize);
            Value::from(python_split(s, sep, max, method == "rsplit")?)
        }
        "splitlines" => {
            arity(0)?;
            Value::from(s.lines().map(Value::from).collect::<Vec<_>>())
        }
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "capitalize" => {
            let mut chars = s.chars();
            Value::from(match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.flat_map(char::to_lowercase))
                    .collect(),
                None => String::new(),
            })
        }
        "title" => {
            let mut out = String::with_capacity(s.len());
            let mut prev_alpha = false;
            for c in s.chars() {
                if prev_alpha {
                    out.extend(c.to_lowercase());
                } else {
                    out.extend(c.to_uppercase());
                }
                prev_alpha = c.is_alphabetic();
            }
            Value::from(out)
        }
        "replace" => {
            arity(3)?;
            let (Some(from), Some(to)) = (str_arg(args, 0, method)?, str_arg(args, 1, method)?)
            else {
                return Err(bad_args(method, "(old, new[, count])"));
            };
            Value::from(match int_arg(args, 2, method)? {
                Some(n) if n >= 0 => s.replacen(from, to, n as usize),
                _ => s.replace(from, to),
            })
        }
        "find" | "rfind" | "count" => {
            arity(1)?;
            let needle = str_arg(args, 0, method)?.ok_or_else(|| bad_args(method, "a string"))?;
            let char_index = |byte: usize| s[..byte].chars().count() as i64;
            Value::from(match method {
                "find" => s.find(needle).map_or(-1, char_index),
                "rfind" => s.rfind(needle).map_or(-1, char_index),
                _ if needle.is_empty() => s.chars().count() as i64 + 1,
                _ => s.matches(needle).count() as i64,
            })
        }
        "join" => {
            arity(1)?;
            let items = args
                .first()
                .ok_or_else(|| bad_args(method, "an iterable"))?
                .try_iter()
                .map_err(|_| bad_args(method, "an iterable"))?;
            let parts: Vec<String> = items.map(|v| v.to_string()).collect();
            Value::from(parts.join(s))
        }
        "isdigit" | "isnumeric" | "isdecimal" => {
            Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric()))
        }
        "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
        "isalnum" => Value::from(!s.is_empty() && s.chars().all(char::is_alphanumeric)),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
        "islower" => {
            Value::from(s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase))
        }
        "isupper" => {
            Value::from(s.chars().any(char::is_uppercase) && !s.chars().any(char::is_lowercase))
        }
        _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    })
}

/// Python's `str.split` / `str.rsplit`: on whitespace runs without a separator.
fn python_split(
    s: &str,
    sep: Option<&str>,
    max: Option<usize>,
    from_right: bool,
) -> std::result::Result<Vec<Value>, minijinja::Error> {
    let parts: Vec<String> = match sep {
        Some("") => return Err(bad_args("split", "a non-empty separator")),
        Some(sep) => match (max, from_right) {
            (None, _) => s.split(sep).map(str::to_owned).collect(),
            (Some(n), false) => s.splitn(n + 1, sep).map(str::to_owned).collect(),
            (Some(n), true) => {
                let mut parts: Vec<String> = s.rsplitn(n + 1, sep).map(str::to_owned).collect();
                parts.reverse();
                parts
            }
        },
        None => split_whitespace(s, max.unwrap_or(usize::MAX), from_right),
    };
    Ok(parts.into_iter().map(Value::from).collect())
}

/// `str.split()` / `str.rsplit()` without a separator: at most `max` splits on whitespace
/// runs; the unsplit remainder keeps its inner (and far-side) whitespace, as in Python.
fn split_whitespace(s: &str, max: usize, from_right: bool) -> Vec<String> {
    let mut parts = Vec::new();
    if from_right {
        let mut rest = s.trim_end();
        while parts.len() < max && !rest.is_empty() {
            let start = rest
                .char_indices()
                .rev()
                .find(|(_, c)| c.is_whitespace())
                .map_or(0, |(i, c)| i + c.len_utf8());
            parts.push(rest[start..].to_owned());
            rest = rest[..start].trim_end();
        }
        if !rest.is_empty() {
            parts.push(rest.to_owned());
        }
        parts.reverse();
    } else {
        let mut rest = s.trim_start();
        while parts.len() < max && !rest.is_empty() {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            parts.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
        if !rest.is_empty() {
            parts.push(rest.to_owned());
        }
    }
    parts
}

fn map_method(map: &Value, method: &str, args: &[Value]) -> MethodResult {
    let keys =
        || -> std::result::Result<Vec<Value>, minijinja::Error> { Ok(map.try_iter()?.collect()) };
    Ok(match method {
        "items" => {
            let mut items = Vec::new();
            for key in keys()? {
                let value = map.get_item(&key)?;
                items.push(Value::from(vec![key, value]));
            }
            Value::from(items)
        }
        "keys" => Value::from(keys()?),
        "values" => {
            let mut values = Vec::new();
            for key in keys()? {
                values.push(map.get_item(&key)?);
            }
            Value::from(values)
        }
        "get" => {
            let key = args.first().ok_or_else(|| bad_args(method, "a key"))?;
            if args.len() > 2 {
                return Err(bad_args(method, "(key[, default])"));
            }
            let value = map.get_item(key)?;
            if value.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                value
            }
        }
        _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(template: &str, messages: &[ChatMessage]) -> Result<String> {
        render(
            template,
            &Context {
                messages,
                add_generation_prompt: true,
                bos_token: Some("<s>"),
                eos_token: Some("</s>"),
                extra: &serde_json::Map::new(),
            },
        )
    }

    #[test]
    fn chat_template_python_methods() {
        let messages = [ChatMessage::new(
            "user",
            "  <think>x</think>\n\nHello World  ",
        )];
        let t = "{{ messages[0].content.strip() }}|{{ messages[0].content.split('</think>')[-1].lstrip('\\n').rstrip() }}|\
                 {{ messages[0]['role'].upper() }}|{{ messages[0].get('missing', 'dflt') }}|\
                 {{ messages[0].get('role') }}|{% for k, v in messages[0].items() %}{{ k }}={{ v|length }};{% endfor %}|\
                 {{ 'a b  c'.split() }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'a,b,c'.rsplit(',', 1) }}|\
                 {{ ' a b  c '.split(none, 1) }}{{ ' a b  c '.rsplit(none, 1) }}|{{ 'x'.startswith(('y', 'x')) }}|{{ 'hello world'.title() }}|{{ 'aXa'.replace('a', 'b') }}|\
                 {{ '-'.join(['a', 'b']) }}|{{ 'abcb'.find('b') }}|{{ 'abcb'.count('b') }}";
        assert_eq!(
            render_str(t, &messages).unwrap(),
            "<think>x</think>\n\nHello World|Hello World|USER|dflt|user|content=33;role=4;|\
             [\"a\", \"b\", \"c\"]|[\"a\", \"b,c\"]|[\"a,b\", \"c\"]|[\"a\", \"b  c \"][\" a b\", \"c\"]|True|Hello World|bXb|a-b|1|2"
        );
    }

    #[test]
    fn chat_template_raise_exception_and_syntax_errors() {
        let t = "{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}";
        let err = render_str(t, &[ChatMessage::user("hi")]).unwrap_err();
        assert!(
            matches!(&err, Error::ChatTemplate(m) if m.contains("System first!")),
            "{err}"
        );
        let err = render_str("{% for %}", &[]).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)));
    }

    #[test]
    fn chat_template_trims_blocks_and_knows_tools_is_none() {
        let t = "{% if tools is not none %}TOOLS{% endif %}\n  {% for m in messages %}\n[{{ m.content }}]\n{% endfor %}\n{{ bos_token }}{{ eos_token }}";
        let out = render_str(t, &[ChatMessage::user("a"), ChatMessage::user("b")]).unwrap();
        assert_eq!(out, "[a]\n[b]\n<s></s>");
    }

    #[test]
    fn chat_template_tojson_is_python_json_dumps() {
        let messages = [ChatMessage::new("user", "<b>é\n\"</b>")];
        // Single-key maps only: key order depends on minijinja's `preserve_order` feature.
        let t = "{{ messages[0].content|tojson }}|{{ {'b': [1, 2.5, none, true, {}]}|tojson(indent=2) }}|\
                 {{ messages[0].content|tojson(ensure_ascii=true) }}|{{ [1, []]|tojson(2) }}|\
                 {{ {'x': [1, 2]}|tojson(separators=(',', ':')) }}|{{ {'x': 1}|tojson }}";
        assert_eq!(
            render_str(t, &messages).unwrap(),
            "\"<b>é\\n\\\"</b>\"|\
             {\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true,\n    {}\n  ]\n}|\
             \"<b>\\u00e9\\n\\\"</b>\"|[\n  1,\n  []\n]|{\"x\":[1,2]}|{\"x\": 1}"
        );
    }

    #[test]
    fn chat_template_strftime() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%-d %B %y, %A %H:%M:%S %I%p %%", t),
            "26 July 24, Friday 13:05:09 01PM %"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
