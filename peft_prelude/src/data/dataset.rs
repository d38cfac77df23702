//! Datasets of JSON rows: files (JSON array, JSONL, Parquet), hub dataset repos, in-memory
//! rows; with map, filter, shuffle, select and train/test split.

use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{read_file, Error, Result};
use crate::rng::Rng;

/// One example: named fields (`instruction`, `input`, `output`, `messages`, `text` …).
pub type Row = Map<String, Value>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    rows: Vec<Row>,
}

impl Dataset {
    pub fn from_rows(rows: Vec<Row>) -> Self {
        Dataset { rows }
    }

    /// Any serialisable records (structs with named fields, JSON objects).
    pub fn from_records<T: Serialize>(records: &[T]) -> Result<Self> {
        let rows = records
            .iter()
            .enumerate()
            .map(|(i, r)| match serde_json::to_value(r) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(other) => Err(Error::InvalidArgument(format!(
                    "record {i} is not an object: {other}"
                ))),
                Err(e) => Err(Error::InvalidArgument(format!("record {i}: {e}"))),
            })
            .collect::<Result<_>>()?;
        Ok(Dataset { rows })
    }

    /// A `.json` file holding an array of objects (or `{"data"|"train": [...]}`), or a `.jsonl`
    /// file with one object per line. The format is detected from the content, except that a
    /// `.jsonl` (or `.ndjson`) file is always read as lines.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json_path(path.as_ref())
    }

    fn from_json_path(path: &Path) -> Result<Self> {
        let bytes = read_file(path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| Error::corrupt(path, format!("not UTF-8: {e}")))?;
        let trimmed = text.trim_start();
        // A `.jsonl` file is JSON lines even when it holds one record (which as a whole is
        // also one JSON object).
        let lines_by_name = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson"));
        if !lines_by_name
            && (trimmed.starts_with('[')
                || (trimmed.starts_with('{') && serde_json::from_str::<Value>(text).is_ok()))
        {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| Error::corrupt(path, format!("invalid JSON: {e}")))?;
            let array = match value {
                Value::Array(a) => a,
                Value::Object(mut o) => {
                    match ["data", "train", "rows"].iter().find_map(|k| o.remove(*k)) {
                        Some(Value::Array(a)) => a,
                        _ => {
                            return Err(Error::corrupt(
                                path,
                                "expected a JSON array of objects (or {\"data\": [...]})",
                            ))
                        }
                    }
                }
                _ => return Err(Error::corrupt(path, "expected a JSON array of objects")),
            };
            let rows = array
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok(m),
                    other => Err(Error::corrupt(
                        path,
                        format!("element {i} is not an object: {other}"),
                    )),
                })
                .collect::<Result<_>>()?;
            return Dataset { rows }.non_empty(path);
        }
        let mut rows = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => rows.push(m),
                Ok(_) => {
                    return Err(Error::corrupt(
                        path,
                        format!("line {}: not a JSON object", i + 1),
                    ))
                }
                Err(e) => {
                    return Err(Error::corrupt(
                        path,
                        format!("line {}: invalid JSON: {e}", i + 1),
                    ))
                }
            }
        }
        Dataset { rows }.non_empty(path)
    }

    /// A data file by its extension: `.parquet` through [`from_parquet_file`](Self::from_parquet_file),
    /// anything else as JSON / JSONL.
    ///
    /// A file without a single record is an error naming it (training on it could only fail
    /// later, further from the cause).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_path(path.as_ref())
    }

    fn from_path(path: &Path) -> Result<Self> {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
        {
            Self::from_parquet_file(path)
        } else {
            Self::from_json_file(path)
        }
    }

    fn non_empty(self, path: &Path) -> Result<Self> {
        if self.rows.is_empty() {
            Err(Error::corrupt(path, "no records (an empty dataset)"))
        } else {
            Ok(self)
        }
    }

    /// A Parquet file (as the hub's converted dataset splits): one row per record, columns
    /// as fields (strings, numbers, booleans, lists and structs become JSON values).
    /// The reader is a small tool built with cargo the first time (see [`super::parquet`]).
    pub fn from_parquet_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_parquet_path(path.as_ref())
    }

    fn from_parquet_path(path: &Path) -> Result<Self> {
        let rows = super::parquet::read_rows(path)?;
        Dataset { rows }.non_empty(path)
    }

    /// A dataset repository on the hub (e.g. `yahma/alpaca-cleaned` with
    /// `alpaca_data_cleaned.json`, or a `.parquet` split), through the standard Hugging Face
    /// cache.
    pub fn from_hub(repo: &str, file: &str) -> Result<Self> {
        Self::from_hub_with(repo, file, &crate::hub::HubOptions::from_env())
    }

    /// [`Dataset::from_hub`] with an explicit cache, endpoint and token.
    pub fn from_hub_with(repo: &str, file: &str, hub: &crate::hub::HubOptions) -> Result<Self> {
        let path = crate::hub::HubRepo::new(hub, crate::hub::RepoKind::Dataset, repo).get(file)?;
        Self::from_file(path)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn get(&self, i: usize) -> Option<&Row> {
        self.rows.get(i)
    }

    /// Names of the fields of the first row.
    pub fn column_names(&self) -> Vec<String> {
        self.rows
            .first()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A new dataset with `f` applied to every row (`f` may add, change or drop fields).
    pub fn map(&self, f: impl Fn(&Row) -> Result<Row>) -> Result<Self> {
        Ok(Dataset {
            rows: self.rows.iter().map(f).collect::<Result<_>>()?,
        })
    }

    pub fn filter(&self, f: impl Fn(&Row) -> bool) -> Self {
        Dataset {
            rows: self.rows.iter().filter(|r| f(r)).cloned().collect(),
        }
    }

    /// Fisher–Yates with our seeded RNG: the same seed gives the same order everywhere.
    pub fn shuffle(&self, seed: u64) -> Self {
        let mut rows = self.rows.clone();
        shuffle_in_place(&mut rows, seed);
        Dataset { rows }
    }

    /// Rows `range` (clamped to the dataset).
    pub fn select(&self, range: std::ops::Range<usize>) -> Self {
        let end = range.end.min(self.rows.len());
        let start = range.start.min(end);
        Dataset {
            rows: self.rows[start..end].to_vec(),
        }
    }

    /// Shuffled split: `test_size` a fraction in (0, 1) or, if ≥ 1, a row count.
    pub fn train_test_split(&self, test_size: f64, seed: u64) -> Result<(Self, Self)> {
        let n = self.rows.len();
        let n_test = if test_size >= 1.0 {
            test_size as usize
        } else {
            (test_size * n as f64).ceil() as usize
        };
        if test_size <= 0.0 || n_test == 0 || n_test >= n {
            return Err(Error::InvalidArgument(format!(
                "test_size {test_size} leaves no rows for training or testing ({n} rows)"
            )));
        }
        let shuffled = self.shuffle(seed);
        Ok((shuffled.select(n_test..n), shuffled.select(0..n_test)))
    }

    /// The string field `name` of row `i`, with an error that names both when it is missing.
    pub fn text(&self, i: usize, name: &str) -> Result<&str> {
        field_str(&self.rows[i], name).map_err(|e| Error::InvalidArgument(format!("row {i}: {e}")))
    }
}

/// A row's string field.
pub fn field_str<'a>(row: &'a Row, name: &str) -> std::result::Result<&'a str, String> {
    match row.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Null) | None => Err(format!(
            "missing field `{name}` (the row has: {})",
            row.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
        Some(other) => Err(format!("field `{name}` is not a string: {other}")),
    }
}

/// Which units (examples, packed rows, preference pairs) micro-batch `index` of a training
/// run holds: epoch `index / per_epoch`, in an order shuffled with `seed + epoch`, so the
/// sequence depends only on the index (resuming from a checkpoint replays it). The current
/// epoch's order is kept rather than reshuffled for every micro-batch.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    units: usize,
    batch_size: usize,
    seed: u64,
    epoch_order: Option<(usize, Vec<usize>)>,
}

impl BatchOrder {
    pub fn new(units: usize, batch_size: usize, seed: u64) -> Self {
        BatchOrder {
            units,
            batch_size: batch_size.max(1),
            seed,
            epoch_order: None,
        }
    }

    /// Micro-batches per epoch (the last one may be short).
    pub fn per_epoch(&self) -> usize {
        self.units.div_ceil(self.batch_size).max(1)
    }

    /// The unit indices of micro-batch `index`.
    pub fn indices(&mut self, index: usize) -> &[usize] {
        let epoch = index / self.per_epoch();
        let within = index % self.per_epoch();
        if self.epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.units).collect();
            shuffle_in_place(&mut order, self.seed.wrapping_add(epoch as u64));
            self.epoch_order = Some((epoch, order));
        }
        let order = &self.epoch_order.as_ref().expect("set above").1;
        let end = ((within + 1) * self.batch_size).min(self.units);
        &order[(within * self.batch_size).min(end)..end]
    }
}

pub(crate) fn shuffle_in_place<T>(items: &mut [T], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_order_covers_each_epoch_once_and_depends_only_on_the_index() {
        let mut a = BatchOrder::new(10, 4, 7);
        assert_eq!(a.per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|i| a.indices(i).to_vec()).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        // A fresh order asked for a later batch first (a resumed run) agrees.
        let mut b = BatchOrder::new(10, 4, 7);
        assert_eq!(b.indices(4).to_vec(), a.indices(4).to_vec());
        assert_eq!(b.indices(1).to_vec(), a.indices(1).to_vec());
        assert_ne!(
            a.indices(0).to_vec(),
            a.indices(3).to_vec(),
            "epochs are shuffled differently"
        );
    }
}
