//! Arbitrary bytes as chunks handed to `transfer::Receiver::accept`.
//!
//! Input: a flags byte, a declared length (u32 LE), an offset (u64 LE), then a body.
//!
//! flags bit 0 clear — one hostile chunk: the body is the chunk's wire data as it is, with
//!   the declared length and offset from the input. Its checksum is, with bit 6 clear, the
//!   BLAKE3 of what the body inflates to (computed as the receiver does, so the fuzzer can
//!   reach the tar decoder through gzip), or with bit 6 set the first ≤32 body bytes.
//! flags bit 0 set — an honest sender: the body is a tar stream, cut into chunks, each
//!   sealed with `transfer::seal`; with bit 1 set one of them (picked by the declared
//!   length) is first sent tampered with. Then `finish` with the right digest.
//! bits 2–3 pick the chunk size: 512, 4096, MIN_CHUNK_SIZE or MAX_CHUNK_SIZE (sizes below
//!   MIN_CHUNK_SIZE cannot be asked for through the service, but the receiver does not rely
//!   on that, and they let a small input span several chunks).
//! bit 4 set — no compression, else gzip.
//! bit 7 set — fix up tar header checksums in the body first (honest mode, or hostile mode
//!   without compression; see `dispatch_fuzz::fix_checksums`).
//! bit 5 set — drop the receiver and reopen it from its journal between chunks (after a
//!   checkpoint in the honest mode; in the hostile mode the same chunk is sent again to a
//!   reopened receiver, which, unless `finish` ran, restarts from offset 0 over what the
//!   first attempt wrote).
//!
//! Must hold: no panic; a tampered uncompressed chunk is refused; the transfer area holds
//! only the receiver's own files; the staged tree is confined (see `assert_confined`).

#![no_main]

use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use dispatch_broker::tar_decode::ArchiveLimits;
use dispatch_broker::transfer::{
    Compression, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, RawChunk, Receiver, STAGED_TREE, TransferParams,
    seal,
};
use dispatch_fuzz::{assert_confined, assert_only, fix_checksums};
use dispatch_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;

/// Everything the receiver itself keeps in its area (transfer.rs); anything else there
/// came out of the staged tree. Keep in step with `Receiver`.
const AREA_FILES: [&str; 5] = [
    "journal.json",
    "journal.json.tmp",
    "chunks.bin",
    "dir-times.txt",
    STAGED_TREE,
];

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<13>() else {
        return;
    };
    let flags = head[0];
    let mut body = body.to_vec();
    if flags & 0x80 != 0 && (flags & 1 != 0 || flags & 0x10 != 0) {
        fix_checksums(&mut body);
    }
    let body = &body[..];
    let declared = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    let offset = u64::from_le_bytes([
        head[5], head[6], head[7], head[8], head[9], head[10], head[11], head[12],
    ]);
    let chunk_size = [512, 4096, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE][usize::from(flags >> 2 & 3)];
    let compression = if flags & 0x10 != 0 {
        Compression::None
    } else {
        Compression::Gzip
    };
    let reopen = flags & 0x20 != 0;
    let params = TransferParams {
        destination: "dest".into(),
        chunk_size,
        compression,
    };
    let limits = ArchiveLimits::default();

    let tmp = tempfile::tempdir().expect("create a scratch directory");
    let area = tmp.path().join("area");
    let open = || match Receiver::open(&area, params.clone(), limits) {
        Ok(receiver) => receiver,
        Err(e) => panic!("opening the transfer area failed: {e}"),
    };

    if flags & 1 == 0 {
        hostile(
            open(),
            body,
            declared,
            offset,
            compression,
            flags & 0x40 != 0,
        );
        if reopen {
            // Unless `finish` ran, nothing was checkpointed since the open: the retry starts
            // from offset 0 over whatever the first attempt wrote.
            hostile(
                open(),
                body,
                declared,
                offset,
                compression,
                flags & 0x40 != 0,
            );
        }
    } else {
        honest(
            &area,
            open,
            body,
            declared,
            chunk_size,
            compression,
            reopen,
            flags & 2 != 0,
        );
    }

    assert_only(tmp.path(), &["area"]);
    assert_only(&area, &AREA_FILES);
    assert_confined(&area.join(STAGED_TREE));
});

/// One chunk as the input gives it, then, if it was applied, `finish` with a matching
/// digest.
fn hostile(
    mut receiver: Receiver,
    body: &[u8],
    declared: u32,
    offset: u64,
    compression: Compression,
    raw_checksum: bool,
) {
    let checksum = if raw_checksum {
        Bytes::copy_from_slice(&body[..body.len().min(32)])
    } else {
        let inflated = match compression {
            Compression::None => Some(body.to_vec()),
            Compression::Gzip => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(body)
                    .take(u64::from(declared) + 1)
                    .read_to_end(&mut out)
                    .ok()
                    .map(|_| out)
            }
        };
        match inflated {
            Some(bytes) => Bytes::copy_from_slice(blake3::hash(&bytes).as_bytes()),
            None => Bytes::from_static(&[0; 32]),
        }
    };
    let chunk = pb::Chunk {
        offset,
        data: Bytes::copy_from_slice(body),
        length: declared,
        checksum: checksum.clone(),
        compression: i32::from(declared % 3 == 0),
    };
    if receiver.accept(&chunk).is_ok() {
        assert_eq!(
            Some(receiver.next_offset()),
            offset.checked_add(u64::from(declared)),
            "an applied chunk did not move the offset by its length"
        );
        let digest = blake3::hash(&checksum);
        let end = receiver.next_offset();
        let _ = receiver.finish(end, digest.as_bytes());
    }
}

/// The body as a tar stream sent by a sender that follows the protocol.
#[allow(clippy::too_many_arguments)]
fn honest(
    area: &Path,
    open: impl Fn() -> Receiver,
    body: &[u8],
    declared: u32,
    chunk_size: u32,
    compression: Compression,
    reopen: bool,
    tamper: bool,
) {
    let mut receiver = open();
    let pieces: Vec<&[u8]> = body.chunks(chunk_size as usize).collect();
    let tampered = (declared as usize) % pieces.len().max(1);
    let mut hashes = Vec::new();
    let mut at = 0u64;
    for (i, piece) in pieces.iter().enumerate() {
        let hash = *blake3::hash(piece).as_bytes();
        let raw = RawChunk {
            offset: at,
            data: Bytes::copy_from_slice(piece),
            hash,
        };
        let sealed = match seal(&raw, compression) {
            Ok(sealed) => sealed,
            Err(e) => panic!("sealing a chunk failed: {e}"),
        };
        let mut applied = false;
        if tamper && i == tampered {
            let mut bad = sealed.clone();
            let mut bytes = bad.data.to_vec();
            let at_byte = (declared >> 8) as usize % bytes.len();
            bytes[at_byte] ^= 1 << (declared >> 29);
            bad.data = bytes.into();
            let result = receiver.accept(&bad);
            // A gzip member can change in its header without changing what it inflates to;
            // a raw chunk cannot.
            if compression == Compression::None {
                assert!(result.is_err(), "a tampered chunk was applied");
            }
            applied = result.is_ok();
        }
        if !applied && receiver.accept(&sealed).is_err() {
            return;
        }
        hashes.extend_from_slice(&hash);
        at += piece.len() as u64;
        assert_eq!(receiver.next_offset(), at);
        if reopen {
            if receiver.checkpoint().is_err() {
                return;
            }
            drop(receiver);
            receiver = open();
            assert_eq!(
                receiver.next_offset(),
                at,
                "a reopened receiver does not resume at its checkpoint"
            );
        }
    }
    let digest = blake3::hash(&hashes);
    if let Ok((summary, tree)) = receiver.finish(at, digest.as_bytes()) {
        assert_eq!(summary.stream_bytes, at);
        assert_eq!(summary.digest, *digest.as_bytes());
        assert_eq!(tree, area.join(STAGED_TREE));
    }
}
