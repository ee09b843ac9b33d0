//! Python's `random` (MT19937, seeded from an int as CPython does) for the one place where
//! kohya's choice is reproducible: `validation_split` with a `validation_seed`, where kohya
//! shuffles the subset's sorted paths with `random.seed(validation_seed); random.shuffle(...)`.

pub(crate) struct PyRandom {
    mt: [u32; 624],
    index: usize,
}

impl PyRandom {
    fn init_genrand(s: u32) -> [u32; 624] {
        let mut mt = [0u32; 624];
        mt[0] = s;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        mt
    }

    /// CPython's random.seed(int): init_by_array over the 32-bit words of |seed|.
    pub(crate) fn new(seed: u64) -> Self {
        let key: Vec<u32> =
            if seed >> 32 == 0 { vec![seed as u32] } else { vec![seed as u32, (seed >> 32) as u32] };
        let mut mt = Self::init_genrand(19_650_218);
        let n = 624usize;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..n.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= n {
                mt[0] = mt[n - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..n - 1 {
            mt[i] =
                (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= n {
                mt[0] = mt[n - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        Self { mt, index: n }
    }

    fn next_u32(&mut self) -> u32 {
        const N: usize = 624;
        const M: usize = 397;
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
                let mut v = self.mt[(k + M) % N] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// getrandbits(k) for 1 <= k <= 32.
    fn getrandbits(&mut self, k: u32) -> u32 {
        self.next_u32() >> (32 - k)
    }

    /// _randbelow_with_getrandbits(n), n >= 1.
    fn randbelow(&mut self, n: usize) -> usize {
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// random.shuffle (lists shorter than 2^32 items).
    pub(crate) fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i + 1);
            x.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3 for the same seeds.
    #[test]
    fn matches_cpython() {
        let mut r = PyRandom::new(42);
        assert_eq!(
            [r.getrandbits(32), r.getrandbits(32), r.getrandbits(32)],
            [2746317213, 478163327, 107420369]
        );
        let mut x: Vec<u32> = (0..10).collect();
        PyRandom::new(12345678901234).shuffle(&mut x);
        assert_eq!(x, vec![9, 1, 7, 5, 4, 3, 6, 2, 8, 0]);
        let mut x: Vec<u32> = (0..7).collect();
        PyRandom::new(0).shuffle(&mut x);
        assert_eq!(x, vec![4, 2, 1, 0, 5, 3, 6]);
    }
}
