//! Reading the tail of a job's log file without reading it whole: what every backend
//! whose logs are files (local processes, Slurm) needs.

use std::io::{self, Read, Seek, SeekFrom};

/// Bytes read at a time, backwards.
const CHUNK: usize = 64 * 1024;

/// The offset where the last `lines` lines of the file's first `len` bytes start. A final
/// newline ends the last line rather than starting an empty one; a last line without one
/// still counts.
pub fn tail_start(file: &mut (impl Read + Seek), len: u64, lines: u32) -> io::Result<u64> {
    if lines == 0 {
        return Ok(len);
    }
    let mut buf = vec![0; CHUNK];
    let mut end = len;
    let mut seen = 0;
    while end > 0 {
        let start = end.saturating_sub(CHUNK as u64);
        let chunk = &mut buf[..usize::try_from(end - start).unwrap_or(CHUNK)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for (i, byte) in chunk.iter().enumerate().rev() {
            let offset = start + i as u64;
            if *byte != b'\n' || offset + 1 == len {
                continue;
            }
            seen += 1;
            if seen == lines {
                return Ok(offset + 1);
            }
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn tail(text: &str, lines: u32) -> String {
        let mut cursor = Cursor::new(text.as_bytes());
        let start = tail_start(&mut cursor, text.len() as u64, lines).unwrap();
        text[usize::try_from(start).unwrap()..].to_owned()
    }

    #[test]
    fn tail_counts_lines_from_the_end() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a\nb\nc\n", 3), "a\nb\nc\n");
        assert_eq!(tail("a\nb\nc\n", 10), "a\nb\nc\n");
        assert_eq!(tail("a\nb\nc\n", 0), "");
        assert_eq!(tail("", 5), "");
        assert_eq!(tail("\n\n\n", 2), "\n\n");
        assert_eq!(tail("abc", 1), "abc");
    }

    #[test]
    fn tail_crosses_chunk_boundaries() {
        let text: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
        assert!(text.len() > 3 * CHUNK);
        assert_eq!(tail(&text, 2), "line 49998\nline 49999\n");
        let expected: String = (10_000..50_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail(&text, 40_000), expected);
        assert_eq!(tail(&text, 60_000), text);
    }

    #[test]
    fn tail_offsets_in_bytes() -> io::Result<()> {
        let mut cursor = Cursor::new(&b"a\nb\nc\n"[..]);
        assert_eq!(tail_start(&mut cursor, 6, 1)?, 4);
        assert_eq!(tail_start(&mut cursor, 6, 2)?, 2);
        assert_eq!(tail_start(&mut cursor, 6, 5)?, 0);
        assert_eq!(tail_start(&mut cursor, 6, 0)?, 6);
        let mut open = Cursor::new(&b"a\nb"[..]);
        assert_eq!(tail_start(&mut open, 3, 1)?, 2);
        Ok(())
    }
}
