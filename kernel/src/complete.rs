//! `is_complete_request`: does a cell's text end with every bracket, string and comment closed?

/// Jupyter's answer: "complete", "incomplete" (with the indent for the next line) or "invalid".
pub fn is_complete(code: &str) -> (&'static str, String) {
    let mut depth: i64 = 0;
    let mut chars = code.chars().peekable();
    let mut open_string = false;
    let mut block_comments = 0;
    while let Some(c) = chars.next() {
        if block_comments > 0 {
            match (c, chars.peek()) {
                ('*', Some('/')) => {
                    chars.next();
                    block_comments -= 1;
                }
                ('/', Some('*')) => {
                    chars.next();
                    block_comments += 1;
                }
                _ => {}
            }
            continue;
        }
        if open_string {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => open_string = false,
                _ => {}
            }
            continue;
        }
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                block_comments += 1;
            }
            ('"', _) => open_string = true,
            ('\'', _) => {
                // A char literal ('a', '\n', '"') is skipped whole; a lifetime ('a) is not one.
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') {
                    let close = chars.clone().skip(1).position(|c| c == '\'');
                    if let Some(n) = close {
                        for _ in 0..n + 2 {
                            chars.next();
                        }
                    }
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            ('(' | '[' | '{', _) => depth += 1,
            (')' | ']' | '}', _) => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return ("invalid", String::new());
        }
    }
    if depth > 0 || open_string || block_comments > 0 {
        ("incomplete", "    ".repeat(depth.max(0) as usize))
    } else {
        ("complete", String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::is_complete;

    #[test]
    fn brackets_strings_and_comments() {
        assert_eq!(is_complete("let x = 1;").0, "complete");
        assert_eq!(
            is_complete("fn f() {\n let a = [1,"),
            ("incomplete", "        ".into())
        );
        assert_eq!(is_complete("let s = \"a { \\\" b\";").0, "complete");
        assert_eq!(is_complete("let s = \"open").0, "incomplete");
        assert_eq!(is_complete("let c = '{'; // {").0, "complete");
        assert_eq!(is_complete("fn f<'a>(x: &'a str) {}").0, "complete");
        assert_eq!(is_complete("/* { */ 1").0, "complete");
        assert_eq!(is_complete("1 }").0, "invalid");
    }
}
