//! Training data: preparation of token shards from text, and batches read back from them.

mod loader;
mod prepare;

pub use bd3lm_config::shards::{
    INDEX_FILE, ShardEntry, ShardIndex, Split, SplitStats, TokenWidth, checksum, read_shard,
};
pub use loader::{Loader, Position};
pub(crate) use prepare::write_atomic;
pub use prepare::{PrepareOptions, ShardWriter, prepare};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::shards;

    /// Three documents of 7, 5 and 9 words: the stream is the words with one EOS after each
    /// document; rows are BOS + 6 ids + EOS, and the last partial row is dropped.
    #[test]
    fn preparation_wraps_documents_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![
            "w1 w2 w3 w4 w5 w6 w7\n".to_string(),
            "w2 w2\nw2 w2 w2\n".to_string(),
            "w9 w8 w7 w6 w5 w4 w3 w2 w1\n".to_string(),
        ];
        let (out, index) = shards(dir.path(), &docs, 8, 0);
        assert_eq!(index.train.documents, 3);
        assert_eq!(index.train.tokens, 7 + 5 + 9 + 3);
        assert_eq!(index.train.rows, 24 / 6);
        assert_eq!(index.train.dropped_tokens, 0);
        assert_eq!(index.validation.rows, 0);
        assert_eq!(index.width, TokenWidth::U16);
        let mut ids = Vec::new();
        for shard in index.shards(Split::Train) {
            ids.extend(read_shard(&out, &index, shard).unwrap());
        }
        let stream: Vec<u32> = [
            &[1, 2, 3, 4, 5, 6, 7, 10][..],
            &[2, 2, 2, 2, 2, 10],
            &[9, 8, 7, 6, 5, 4, 3, 2, 1, 10],
        ]
        .concat();
        let rows: Vec<u32> = stream
            .chunks(6)
            .flat_map(|body| [&[10][..], body, &[10]].concat())
            .collect();
        assert_eq!(ids, rows);
        // Reading back through a loader gives the same rows in file order.
        let mut loader = Loader::open(&out, Split::Train, None, Position::default()).unwrap();
        assert_eq!(loader.next_batch(4).unwrap(), rows);
        assert_eq!(loader.position().epoch, 1);
    }

    #[test]
    fn every_nth_document_is_held_out() {
        let dir = tempfile::tempdir().unwrap();
        let docs = crate::test_util::counting_docs(6, 14);
        let (_, index) = shards(dir.path(), &docs, 8, 3);
        assert_eq!((index.train.documents, index.validation.documents), (4, 2));
        assert_eq!(index.validation.tokens, 2 * 15);
        assert!(
            index.split_rule.contains("i % 3 == 2"),
            "{}",
            index.split_rule
        );
    }

    #[test]
    fn damaged_or_truncated_shards_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let docs = crate::test_util::counting_docs(4, 30);
        let (out, index) = shards(dir.path(), &docs, 8, 0);
        let entry = index.shards(Split::Train).next().unwrap().clone();
        let path = out.join(&entry.file);
        let bytes = std::fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        flipped[5] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let err = read_shard(&out, &index, &entry).unwrap_err().to_string();
        assert!(
            err.contains(&entry.file) && err.contains("checksum"),
            "{err}"
        );
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = ShardIndex::open(&out).unwrap_err().to_string();
        assert!(
            err.contains(&entry.file) && err.contains("truncated"),
            "{err}"
        );
        let err = read_shard(&out, &index, &entry).unwrap_err().to_string();
        assert!(err.contains(&entry.file), "{err}");
        std::fs::write(out.join(INDEX_FILE), "{\"format\": 3}").unwrap();
        let err = ShardIndex::open(&out).unwrap_err().to_string();
        assert!(err.contains(INDEX_FILE), "{err}");
    }

    /// A mutated index.json is refused or read, and the shards it then names are read or
    /// refused, never with a panic (lengths that overflow included).
    #[test]
    fn fuzzed_shard_indexes_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let docs = crate::test_util::counting_docs(4, 30);
        let (out, _) = shards(dir.path(), &docs, 8, 2);
        let seed = std::fs::read(out.join(INDEX_FILE)).unwrap();
        let budget = std::time::Duration::from_secs(2);
        bd3lm_bytes::fuzz::fuzz("shard index", &[seed], budget, |text| {
            std::fs::write(out.join(INDEX_FILE), text).unwrap();
            if let Ok(index) = ShardIndex::open(&out) {
                for entry in &index.shards {
                    let _ = read_shard(&out, &index, entry);
                }
            }
        });
    }

    #[test]
    fn a_shuffled_loader_resumes_from_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let docs = crate::test_util::counting_docs(8, 40);
        let (out, _) = shards(dir.path(), &docs, 8, 0);
        let mut a = Loader::open(&out, Split::Train, Some(7), Position::default()).unwrap();
        a.next_batch(5).unwrap();
        let mut b = Loader::open(&out, Split::Train, Some(7), a.position()).unwrap();
        for _ in 0..20 {
            assert_eq!(a.next_batch(3).unwrap(), b.next_batch(3).unwrap());
        }
        let mut plain = Loader::open(&out, Split::Train, None, Position::default()).unwrap();
        let mut shuffled = Loader::open(&out, Split::Train, Some(7), Position::default()).unwrap();
        assert_ne!(
            plain.next_batch(8).unwrap(),
            shuffled.next_batch(8).unwrap()
        );
    }
}
