//! Seeded random streams shared by the stages.

use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

/// A generator whose stream is fixed by `(seed, stream, index)`: SplitMix64-style mixing so that
/// nearby (stream, index) pairs give unrelated seeds.
pub fn seeded(seed: u64, stream: u64, index: u64) -> Xoshiro256PlusPlus {
    let mut x = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    Xoshiro256PlusPlus::seed_from_u64(x ^ (x >> 31))
}
