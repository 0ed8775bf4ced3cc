//! The decoders under hostile input, on stable Rust: the functions the
//! cargo-fuzz targets call (`src/fuzzing.rs`) run on the seeds in
//! `fuzz/seeds/<target>/` (the documentation's examples), on mutations of
//! them and on random bytes. Any panic fails the test. The run is bounded
//! and repeatable (a fixed seed); `DECODER_CASES` raises the number of
//! generated inputs per target (default 20 000).

use refund_worker::fuzzing::TARGETS;
use std::path::Path;

/// xorshift64*: repeatable pseudo-random numbers without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to the formats: JSON, XML, URL-encoding, AMQP types.
const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\\",
    b"\\u0000",
    b"-1",
    b"1e309",
    b"18446744073709551616",
    b"null",
    b"true",
    b"<",
    b">",
    b"</",
    b"&amp;",
    b"&#0;",
    b"<![CDATA[",
    b"=",
    b"&",
    b"%",
    b"%zz",
    b"\0",
    b"\xff",
    b"\xf0\x9f\x92\xb8",
    b"S\xff\xff\xff\xff",
    b"F\x00\x00\x00\x10",
    b"A\x7f\xff\xff\xff",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                data.splice(at..at, token.iter().copied());
            }
            2 if at < data.len() => {
                let end = (at + rng.below(16) + 1).min(data.len());
                data.drain(at..end);
            }
            3 => data.truncate(at),
            4 if !data.is_empty() => {
                // Repeat a slice (deep nesting, long strings).
                let end = (at + rng.below(32) + 1).min(data.len());
                let piece: Vec<u8> = data[at.min(end)..end].to_vec();
                for _ in 0..rng.below(64) {
                    data.splice(at..at, piece.iter().copied());
                }
            }
            5 => {
                let byte = rng.next() as u8;
                data.insert(at, byte);
            }
            _ => {}
        }
    }
    data
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.expect("entry").path()).expect("seed"))
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

#[test]
fn no_decoder_panics_on_examples_mutations_or_noise() {
    let cases: usize = std::env::var("DECODER_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    for (name, target) in TARGETS {
        let seeds = seeds(name);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for seed in &seeds {
            target(seed);
        }
        for i in 0..cases {
            let input = if i % 10 == 9 {
                (0..rng.below(512)).map(|_| rng.next() as u8).collect()
            } else {
                let seed = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            };
            let outcome = std::panic::catch_unwind(|| target(&input));
            assert!(
                outcome.is_ok(),
                "{name} panicked on input {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        println!("{name}: {} seeds, {cases} generated inputs", seeds.len());
    }
}
