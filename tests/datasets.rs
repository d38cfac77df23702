//! Dataset files: Parquet (snappy and zstd, several row groups, lists and integers) reads to
//! the same rows as the JSONL twin written from the same records by pyarrow's script.

use peft_prelude::data::Dataset;
use peft_prelude::Error;
use peft_tests::fixture;

#[test]
fn parquet_rows_equal_the_jsonl_records() {
    let want = Dataset::from_json_file(fixture("data/records.jsonl")).unwrap();
    assert_eq!(want.len(), 5);
    for name in ["records.snappy.parquet", "records.zstd.parquet"] {
        let got = Dataset::from_file(fixture(&format!("data/{name}"))).unwrap();
        assert_eq!(got, want, "{name}");
        assert_eq!(got.text(2, "input").unwrap(), "I lost my keys again ☹");
        assert_eq!(got.rows()[1]["tags"], serde_json::json!(["fr", "greeting"]));
        assert_eq!(got.rows()[4]["id"], serde_json::json!(5));
    }
}

#[test]
fn a_file_that_is_not_parquet_is_named_in_the_error() {
    let dir = std::env::temp_dir().join(format!("peft-datasets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("train.parquet");
    std::fs::write(&bad, b"instruction,output\nhi,there\n").unwrap();
    let err = Dataset::from_file(&bad).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("train.parquet"), "{err}");
    // Truncated: the real file cut in half loses its footer.
    let bytes = std::fs::read(fixture("data/records.zstd.parquet")).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let err = Dataset::from_file(&bad).unwrap_err();
    assert!(err.to_string().contains("train.parquet"), "{err}");
    let missing = Dataset::from_file(dir.join("nope.parquet")).unwrap_err();
    assert!(missing.to_string().contains("nope.parquet"), "{missing}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The user's path to the Parquet reader: built by cargo into `~/.cache/peft-tools` the first
/// time (nothing to do when it is there and current), then the same rows as the copy the test
/// scripts build with the workspace.
#[test]
fn the_parquet_reader_builds_on_first_use_and_reads_the_same_rows() {
    let built = peft_prelude::data::parquet::built_reader().unwrap();
    assert!(built.is_file(), "{}", built.display());
    let out = std::process::Command::new(&built)
        .arg(fixture("data/records.zstd.parquet"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = Dataset::from_json_file(fixture("data/records.jsonl")).unwrap();
    assert_eq!(rows.len(), want.len());
    for (got, want) in rows.iter().zip(want.rows()) {
        assert_eq!(got.as_object().unwrap(), want);
    }
    // A damaged file makes the tool exit with the reader's reason, not a crash of ours.
    let dir = std::env::temp_dir().join(format!("peft-datasets-built-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.parquet");
    std::fs::write(&bad, b"PAR1 not really PAR1").unwrap();
    let out = std::process::Command::new(&built)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stderr.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_jsonl_file_with_one_record_is_one_row() {
    let dir = std::env::temp_dir().join(format!("peft-datasets-one-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let one = dir.join("one.jsonl");
    std::fs::write(
        &one,
        "{\"instruction\": \"Label\", \"output\": \"positive\"}\n",
    )
    .unwrap();
    let data = Dataset::from_file(&one).unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data.text(0, "output").unwrap(), "positive");
    std::fs::remove_dir_all(dir).unwrap();
}
