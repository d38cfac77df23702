//! `peft-parquet-rows FILE`: every row of a Parquet file as one JSON object per line on stdout
//! (columns as fields; strings, numbers, booleans, lists and structs as JSON values).
//!
//! The prelude runs this instead of linking the Parquet reader: parquet and its codecs were an
//! eighth of the prelude's first build in the kernel's cache, which every user pays, for one
//! corner (hub datasets converted to Parquet). `peft_prelude::data::parquet` builds it the
//! first time a Parquet file is read.
//!
//! Exit status: 0 with every row written; 2 when the file cannot be read as Parquet (the
//! reason on stderr); 3 when the reader panicked on a damaged file (the panic's message).

use std::io::{BufWriter, Write};
use std::process::ExitCode;

use parquet::file::reader::{FileReader, SerializedFileReader};

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: peft-parquet-rows FILE.parquet");
        return ExitCode::from(2);
    };
    // The reader panics on some damaged files (negative column offsets, a missing dictionary,
    // short bit-packed runs): the message goes to stderr once, through our exit path.
    std::panic::set_hook(Box::new(|_| {}));
    match std::panic::catch_unwind(|| write_rows(std::path::Path::new(&path))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(reason)) => {
            eprintln!("{reason}");
            ExitCode::from(2)
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the reader panicked");
            eprintln!("{message}");
            ExitCode::from(3)
        }
    }
}

fn write_rows(path: &std::path::Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let reader = SerializedFileReader::new(file).map_err(|e| e.to_string())?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| format!("cannot read the rows: {e}"))?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| format!("row {i}: {e}"))?;
        match row.to_json_value() {
            value @ serde_json::Value::Object(_) => {
                serde_json::to_writer(&mut out, &value).map_err(|e| e.to_string())?;
                out.write_all(b"\n").map_err(|e| e.to_string())?;
            }
            other => return Err(format!("row {i} is not a record: {other}")),
        }
    }
    out.flush().map_err(|e| e.to_string())
}
