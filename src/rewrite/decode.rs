//! Content decoders that work in bounded steps: each [`Decoder::step`] turns some input into at
//! most one output buffer's worth (the caller's, [`STEP`] bytes), so a compression bomb is
//! never decoded more than one step ahead of the limits that stop it. Window memory is
//! bounded too: 32 KiB for gzip/deflate, at most 16 MiB for brotli (large-window brotli is
//! refused), at most 8 MiB for zstd (`windowLogMax` 23, what browsers accept).

use std::io;

use brotli::enc::StandardAlloc;
use brotli::{BrotliDecompressStream, BrotliResult, BrotliState};
use flate2::{Decompress, FlushDecompress, Status};

use super::Encoding;

/// Decoded bytes per step: the most one step hands to lol_html.
pub const STEP: usize = 64 * 1024;

/// zstd frames asking for a window above 8 MiB are refused (RFC 8878 §3.1.1.1.2 advice).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

pub enum Decoder {
    Identity,
    /// zlib-wrapped (`deflate`) or gzip (members one after another).
    Flate {
        z: Decompress,
        gzip: bool,
    },
    Brotli(Box<BrotliState<StandardAlloc, StandardAlloc, StandardAlloc>>),
    Zstd(zstd::stream::raw::Decoder<'static>),
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The compressed stream ended; anything after it is ignored.
    pub finished: bool,
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt {what} stream"))
}

impl Decoder {
    pub fn new(encoding: Encoding) -> io::Result<Decoder> {
        Ok(match encoding {
            Encoding::Identity => Decoder::Identity,
            Encoding::Gzip => Decoder::Flate {
                z: Decompress::new_gzip(15),
                gzip: true,
            },
            Encoding::Deflate => Decoder::Flate {
                z: Decompress::new(true),
                gzip: false,
            },
            Encoding::Brotli => Decoder::Brotli(Box::new(BrotliState::new_strict(
                StandardAlloc::default(),
                StandardAlloc::default(),
                StandardAlloc::default(),
            ))),
            Encoding::Zstd => {
                let mut d = zstd::stream::raw::Decoder::new()?;
                d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))?;
                Decoder::Zstd(d)
            }
        })
    }

    /// Decodes from `input` into `out` (at most `out.len()` bytes). Identity copies.
    pub fn step(&mut self, input: &[u8], out: &mut [u8]) -> io::Result<Step> {
        match self {
            Decoder::Identity => {
                let n = input.len().min(out.len());
                out[..n].copy_from_slice(&input[..n]);
                Ok(Step {
                    consumed: n,
                    produced: n,
                    finished: false,
                })
            }
            Decoder::Flate { z, gzip } => {
                let (in0, out0) = (z.total_in(), z.total_out());
                let status = z
                    .decompress(input, out, FlushDecompress::None)
                    .map_err(|_| corrupt(if *gzip { "gzip" } else { "deflate" }))?;
                let consumed = (z.total_in() - in0) as usize;
                let produced = (z.total_out() - out0) as usize;
                let mut finished = status == Status::StreamEnd;
                if finished && *gzip && consumed < input.len() {
                    // Another gzip member follows (RFC 1952 §2.2).
                    *z = Decompress::new_gzip(15);
                    finished = false;
                }
                Ok(Step {
                    consumed,
                    produced,
                    finished,
                })
            }
            Decoder::Brotli(state) => {
                let (mut avail_in, mut in_off) = (input.len(), 0);
                let (mut avail_out, mut out_off, mut total) = (out.len(), 0, 0);
                let result = BrotliDecompressStream(
                    &mut avail_in,
                    &mut in_off,
                    input,
                    &mut avail_out,
                    &mut out_off,
                    out,
                    &mut total,
                    state,
                );
                if matches!(result, BrotliResult::ResultFailure) {
                    return Err(corrupt("brotli"));
                }
                Ok(Step {
                    consumed: in_off,
                    produced: out_off,
                    finished: matches!(result, BrotliResult::ResultSuccess),
                })
            }
            Decoder::Zstd(d) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut inb = InBuffer::around(input);
                let mut outb = OutBuffer::around(out);
                d.run(&mut inb, &mut outb)?;
                Ok(Step {
                    consumed: inb.pos(),
                    produced: outb.pos(),
                    finished: false,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Decodes `data` fed in `feed`-byte pieces with a small output buffer.
    fn decode(enc: Encoding, data: &[u8], feed: usize) -> Vec<u8> {
        let mut d = Decoder::new(enc).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 100];
        'feed: for mut piece in data.chunks(feed) {
            loop {
                let s = d.step(piece, &mut buf).unwrap();
                assert!(s.produced <= buf.len());
                out.extend_from_slice(&buf[..s.produced]);
                piece = &piece[s.consumed..];
                if s.finished {
                    break 'feed;
                }
                if piece.is_empty() && s.produced < buf.len() {
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn every_encoding_decodes_in_small_steps() {
        let text: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode(Encoding::Gzip, &gz, 7), text);
        // Two gzip members make one body.
        let two = [gz.clone(), gz].concat();
        assert_eq!(
            decode(Encoding::Gzip, &two, 1000),
            [&text[..], &text].concat()
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&text).unwrap();
        assert_eq!(decode(Encoding::Deflate, &z.finish().unwrap(), 5), text);
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &text[..], &mut br, &Default::default()).unwrap();
        assert_eq!(decode(Encoding::Brotli, &br, 3), text);
        let zs = zstd::encode_all(&text[..], 3).unwrap();
        assert_eq!(decode(Encoding::Zstd, &zs, 11), text);
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let mut buf = [0u8; 64];
        for enc in [Encoding::Gzip, Encoding::Deflate, Encoding::Zstd] {
            let mut d = Decoder::new(enc).unwrap();
            assert!(d
                .step(b"\xffthis is not compressed at all", &mut buf)
                .is_err());
        }
    }
}
