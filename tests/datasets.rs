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
