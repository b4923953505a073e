//! numpy's `default_rng(seed)` (a `PCG64` bit generator seeded through `SeedSequence`) and the
//! two draws cell-eval2 makes from it: `integers(0, n, size)` (the baseline arm's resampling of
//! control cells) and `permutation(array)` (the split halves of the replicate), so that the
//! baseline and the replicate computed here are the cells cell-eval2 computes them from, not
//! cells like them. Checked against numpy 2 in the unit tests below (values numpy printed).
//!
//! The algorithms, as numpy 1.17+ defines them: `SeedSequence`'s entropy pool of four 32-bit
//! words and its hash mixing; PCG64 (128-bit LCG, XSL-RR output) seeded by
//! `generate_state(4, uint64)`; `integers` by Lemire's bounded multiply and `shuffle` by
//! Fisher-Yates with `random_interval`'s masked rejection, both on the generator's 32-bit draws
//! (the halves of a 64-bit draw, the upper one kept for the next 32-bit draw, whichever call
//! makes it).

const MASK32: u64 = 0xFFFF_FFFF;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const POOL_SIZE: usize = 4;
/// PCG's default 128-bit multiplier.
const PCG_MULTIPLIER: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341;

/// `SeedSequence(seed)`'s entropy pool.
fn seed_pool(seed: u64) -> [u32; POOL_SIZE] {
    let entropy: Vec<u32> = if seed >> 32 == 0 { vec![seed as u32] } else { vec![seed as u32, (seed >> 32) as u32] };
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| {
        let mut value = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        value = value.wrapping_mul(hash_const);
        value ^ (value >> 16)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> 16)
    };
    let mut pool = [0u32; POOL_SIZE];
    for (i, slot) in pool.iter_mut().enumerate() {
        *slot = hashmix(entropy.get(i).copied().unwrap_or(0));
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                pool[dst] = mix(pool[dst], hashmix(pool[src]));
            }
        }
    }
    for &word in entropy.iter().skip(POOL_SIZE) {
        for slot in pool.iter_mut() {
            *slot = mix(*slot, hashmix(word));
        }
    }
    pool
}

/// `SeedSequence(seed).generate_state(n)` (32-bit words).
pub fn generate_state(seed: u64, n: usize) -> Vec<u32> {
    let pool = seed_pool(seed);
    let mut hash_const = INIT_B;
    (0..n)
        .map(|i| {
            let mut value = pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            value = value.wrapping_mul(hash_const);
            value ^ (value >> 16)
        })
        .collect()
}

/// `numpy.random.default_rng(seed)`.
#[derive(Debug, Clone)]
pub struct Generator {
    state: u128,
    increment: u128,
    /// The upper half of the last 64-bit draw, not yet used by a 32-bit draw.
    cached: Option<u32>,
}

impl Generator {
    /// The generator `default_rng(seed)` returns.
    pub fn new(seed: u64) -> Generator {
        let words = generate_state(seed, 2 * POOL_SIZE);
        let w = |k: usize| u64::from(words[2 * k]) | (u64::from(words[2 * k + 1]) << 32);
        let init_state = (u128::from(w(0)) << 64) | u128::from(w(1));
        let init_seq = (u128::from(w(2)) << 64) | u128::from(w(3));
        let mut g = Generator { state: 0, increment: (init_seq << 1) | 1, cached: None };
        g.step();
        g.state = g.state.wrapping_add(init_state);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULTIPLIER).wrapping_add(self.increment);
    }

    /// `random_raw()`: the next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        let x = ((s >> 64) as u64) ^ (s as u64);
        x.rotate_right((s >> 122) as u32)
    }

    /// numpy's `next_uint32`: the lower half of a 64-bit draw, then its upper half.
    fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.cached.take() {
            return v;
        }
        let x = self.next_u64();
        self.cached = Some((x >> 32) as u32);
        x as u32
    }

    /// `integers(0, n, size)` for `n >= 1` (int64 results).
    pub fn integers(&mut self, n: u64, size: usize) -> Vec<u64> {
        assert!(n >= 1, "integers needs a non-empty range");
        let range = n - 1;
        if range == 0 {
            return vec![0; size];
        }
        if range <= MASK32 {
            if range == MASK32 {
                return (0..size).map(|_| u64::from(self.next_u32())).collect();
            }
            // Lemire on the generator's 32-bit draws (numpy's `buffered_bounded_lemire_uint32`
            // takes a buffer only to share a template with the 8- and 16-bit draws: the halves
            // of a 64-bit draw carry over from one call to the next).
            let excl = range + 1;
            let threshold = (MASK32 - range) % excl;
            return (0..size)
                .map(|_| {
                    let mut m = u64::from(self.next_u32()) * excl;
                    if m & MASK32 < excl {
                        while m & MASK32 < threshold {
                            m = u64::from(self.next_u32()) * excl;
                        }
                    }
                    m >> 32
                })
                .collect();
        }
        if range == u64::MAX {
            return (0..size).map(|_| self.next_u64()).collect();
        }
        let excl = range + 1;
        let threshold = (u64::MAX - range) % excl;
        (0..size)
            .map(|_| {
                let mut m = u128::from(self.next_u64()) * u128::from(excl);
                if (m as u64) < excl {
                    while (m as u64) < threshold {
                        m = u128::from(self.next_u64()) * u128::from(excl);
                    }
                }
                (m >> 64) as u64
            })
            .collect()
    }

    /// `random_interval(max)`: uniform in `0..=max` by masked rejection.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= MASK32 {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let v = self.next_u64() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `permutation(values)`: a shuffled copy.
    pub fn permutation<T: Copy>(&mut self, values: &[T]) -> Vec<T> {
        let mut out = values.to_vec();
        for i in (1..out.len()).rev() {
            let j = self.interval(i as u64) as usize;
            out.swap(i, j);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The expected values below were printed by numpy 2.4.6 (`np.random.SeedSequence(s)
    // .generate_state(n)`, `default_rng(s).random_raw(n)`, `.integers(0, n, size)`,
    // `.permutation(np.arange(n))`).

    const EXPECTED_STATE_0: [u32; 5] = [2968811710, 3677149159, 745650761, 2884920346, 2642120001];
    const EXPECTED_STATE_BIG: [u32; 3] = [238885397, 226915041, 1322230113];
    const EXPECTED_RAW_12345: [u64; 3] = [4193609425186963869, 5843160025838961886, 14708796524633321433];
    const EXPECTED_INTEGERS_0: [u64; 42] = [
        31, 23, 18, 9, 11, 1, 2, 0, 6, 30, 24, 33, 18, 22, 35, 26, 23, 20, 20, 34, 277, 815, 670, 2, 394, 857, 554, 0,
        0, 0, 3648277232, 878278103, 4315894611, 2707306101, 42, 101, 377, 606, 532, 508, 35, 6,
    ];
    const EXPECTED_MIXED_3: [u64; 9] = [8, 0, 1, 3, 0, 2, 1, 4, 5];
    const EXPECTED_PERMUTATIONS_3: [u64; 25] =
        [0, 4, 2, 1, 3, 0, 15, 12, 5, 8, 3, 13, 14, 10, 6, 1, 2, 11, 16, 0, 9, 4, 7, 1, 0];

    #[test]
    fn the_seed_sequence_is_numpys() {
        assert_eq!(generate_state(0, 5), EXPECTED_STATE_0);
        assert_eq!(generate_state(1 << 40 | 7, 3), EXPECTED_STATE_BIG);
    }

    #[test]
    fn the_raw_draws_are_numpys() {
        let mut g = Generator::new(12345);
        let raw: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        assert_eq!(raw, EXPECTED_RAW_12345);
    }

    #[test]
    fn integers_are_numpys() {
        let mut g = Generator::new(0);
        let mut got = g.integers(37, 20);
        got.extend(g.integers(1000, 7));
        got.extend(g.integers(1, 3));
        got.extend(g.integers(5_000_000_000, 4));
        // Odd counts: the upper half of the last 64-bit draw starts the next call.
        got.extend(g.integers(1260, 5));
        got.extend(g.integers(1260, 3));
        assert_eq!(got, EXPECTED_INTEGERS_0);
    }

    #[test]
    fn integers_and_permutations_share_the_cached_half() {
        let mut g = Generator::new(3);
        let mut got = g.integers(10, 3);
        got.extend(g.permutation(&(0..6u64).collect::<Vec<_>>()));
        assert_eq!(got, EXPECTED_MIXED_3);
    }

    #[test]
    fn permutations_are_numpys() {
        let mut g = Generator::new(3);
        let mut got = Vec::new();
        for n in [1usize, 5, 17, 2] {
            got.extend(g.permutation(&(0..n as u64).collect::<Vec<_>>()));
        }
        assert_eq!(got, EXPECTED_PERMUTATIONS_3);
    }
}
