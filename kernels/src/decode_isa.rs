//! How wide the decoding kernels ([`crate::ggml_matvec`], [`crate::kquant_matvec`],
//! [`crate::nf4_matvec`], the f32 rows) may go: everything the CPU has, or less when the
//! environment variable `PEFT_DECODE_ISA` says so (`avx512`, `avx2`, `generic`), to measure on
//! a machine with AVX-512 what a CPU without it (an AVX2 laptop) or without AVX2 gets. Read
//! once per process.

/// Instruction-set levels, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Generic,
    Avx2,
    Avx512,
}

/// The widest level the kernels may use (`Avx512` unless `PEFT_DECODE_ISA` caps it). A value
/// that names no level is reported once on stderr and ignored.
pub fn cap() -> Level {
    static CAP: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("PEFT_DECODE_ISA") {
        Err(_) => Level::Avx512,
        Ok(v) => parse(&v).unwrap_or_else(|| {
            eprintln!(
                "PEFT_DECODE_ISA={v:?} is not one of avx512, avx2, generic; using what the CPU has"
            );
            Level::Avx512
        }),
    })
}

/// The last of `supported` (ordered plainest first) whose level is within [`cap`]: what a
/// kernel family's `Isa::detect` runs with.
pub(crate) fn fastest<I: Copy>(supported: Vec<I>, level: impl Fn(I) -> Level) -> Option<I> {
    let cap = cap();
    supported.into_iter().rev().find(|&isa| level(isa) <= cap)
}

fn parse(v: &str) -> Option<Level> {
    match v.to_ascii_lowercase().as_str() {
        "avx512" => Some(Level::Avx512),
        "avx2" => Some(Level::Avx2),
        "generic" => Some(Level::Generic),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_order_narrowest_first() {
        assert_eq!(parse("AVX2"), Some(Level::Avx2));
        assert_eq!(parse("generic"), Some(Level::Generic));
        assert_eq!(parse("avx512"), Some(Level::Avx512));
        assert_eq!(parse("sse"), None);
        assert!(Level::Generic < Level::Avx2 && Level::Avx2 < Level::Avx512);
    }
}
