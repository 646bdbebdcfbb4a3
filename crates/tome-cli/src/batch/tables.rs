//! The batch's Parquet tables, rebuilt from every completed document at the end of each run
//! (so a resumed batch's tables hold the documents of all its runs), written atomically:
//! - `chunks.parquet`: one row per chunk: document id, chunk index, token span, character span,
//!   text snippet, embedding (a fixed-size list of f32);
//! - `documents.parquet`: one row per document: id, path, tokens, chunks, seconds, perplexity
//!   (causal models asked for log-probs; null otherwise), document embedding.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use super::store::Meta;

/// One completed document's outputs, read back from its directory.
pub struct DocRows {
    pub meta: Meta,
    pub document: Option<Vec<f32>>,
    /// `[chunks * width]`
    pub chunks: Vec<f32>,
    pub token_spans: Vec<i64>,
    pub char_spans: Vec<i64>,
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> anyhow::Result<Option<Vec<T>>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path)?;
    Ok(Some(npyz::NpyFile::new(&bytes[..])?.into_vec::<T>().with_context(|| format!("reading {}", path.display()))?))
}

impl DocRows {
    pub fn read(dir: &Path, meta: Meta) -> anyhow::Result<Self> {
        if meta.chunks > 0 && !dir.join("chunk_embeddings.npy").exists() {
            bail!("{}: chunk embeddings missing", dir.display());
        }
        Ok(DocRows {
            meta,
            document: read_npy(&dir.join("document_embedding.npy"))?,
            chunks: read_npy(&dir.join("chunk_embeddings.npy"))?.unwrap_or_default(),
            token_spans: read_npy(&dir.join("chunk_token_spans.npy"))?.unwrap_or_default(),
            char_spans: read_npy(&dir.join("chunk_char_spans.npy"))?.unwrap_or_default(),
        })
    }
}

fn embedding_field(width: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), width as i32)
}

fn embeddings<'a>(width: usize, rows: impl Iterator<Item = Option<&'a [f32]>>) -> anyhow::Result<ArrayRef> {
    let mut b = FixedSizeListBuilder::new(Float32Builder::new(), width as i32).with_field(Arc::new(Field::new("item", DataType::Float32, false)));
    for row in rows {
        match row {
            Some(v) if v.len() == width => {
                b.values().append_slice(v);
                b.append(true);
            }
            Some(v) => bail!("an embedding of width {} in a table of width {width}", v.len()),
            None => {
                b.values().append_slice(&vec![0.0; width]);
                b.append(false);
            }
        }
    }
    Ok(Arc::new(b.finish()))
}

fn write(path: &Path, batch: RecordBatch) -> anyhow::Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes both tables under `out`; returns (chunk rows, document rows).
pub fn write_tables(out: &Path, docs: &[DocRows]) -> anyhow::Result<(usize, usize)> {
    let width = docs.iter().find_map(|d| d.document.as_ref().map(Vec::len).or_else(|| (d.meta.chunks > 0).then(|| d.chunks.len() / d.meta.chunks as usize))).unwrap_or(0);

    // Chunks.
    let mut ids = Vec::new();
    let (mut index, mut t0, mut t1, mut c0, mut c1, mut snippet) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows: Vec<&[f32]> = Vec::new();
    for d in docs {
        let n = d.meta.chunks as usize;
        if n > 0 && (d.chunks.len() != n * width || d.token_spans.len() != 2 * n || d.char_spans.len() != 2 * n) {
            bail!("the outputs of document {:?} are inconsistent", d.meta.id);
        }
        for i in 0..n {
            ids.push(d.meta.id.clone());
            index.push(i as u32);
            t0.push(d.token_spans[2 * i] as u64);
            t1.push(d.token_spans[2 * i + 1] as u64);
            let (a, b) = (d.char_spans[2 * i], d.char_spans[2 * i + 1]);
            c0.push((a >= 0).then_some(a));
            c1.push((b >= 0).then_some(b));
            snippet.push(d.meta.snippets.get(i).cloned().unwrap_or_default());
            rows.push(&d.chunks[i * width..(i + 1) * width]);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("document_id", DataType::Utf8, false),
        Field::new("chunk_index", DataType::UInt32, false),
        Field::new("token_start", DataType::UInt64, false),
        Field::new("token_end", DataType::UInt64, false),
        Field::new("char_start", DataType::Int64, true),
        Field::new("char_end", DataType::Int64, true),
        Field::new("snippet", DataType::Utf8, false),
        Field::new("embedding", embedding_field(width), false),
    ]));
    let chunk_rows = ids.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(UInt32Array::from(index)),
        Arc::new(UInt64Array::from(t0)),
        Arc::new(UInt64Array::from(t1)),
        Arc::new(Int64Array::from(c0)),
        Arc::new(Int64Array::from(c1)),
        Arc::new(StringArray::from(snippet)),
        embeddings(width, rows.into_iter().map(Some))?,
    ];
    write(&out.join("chunks.parquet"), RecordBatch::try_new(schema, columns)?)?;

    // Documents.
    let schema = Arc::new(Schema::new(vec![
        Field::new("document_id", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, true),
        Field::new("tokens", DataType::UInt64, false),
        Field::new("chunks", DataType::UInt64, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("perplexity", DataType::Float64, true),
        Field::new("embedding", embedding_field(width), true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(docs.iter().map(|d| d.meta.id.clone()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(docs.iter().map(|d| d.meta.path.clone()).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(docs.iter().map(|d| d.meta.tokens).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(docs.iter().map(|d| d.meta.chunks).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(docs.iter().map(|d| d.meta.seconds).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(docs.iter().map(|d| d.meta.perplexity).collect::<Vec<_>>())),
        embeddings(width, docs.iter().map(|d| d.document.as_deref()))?,
    ];
    write(&out.join("documents.parquet"), RecordBatch::try_new(schema, columns)?)?;
    Ok((chunk_rows, docs.len()))
}
