//! Table lookups for CPUs with AVX512_VBMI: a byte permute across two registers (`vpermi2b`)
//! looks up 64 bytes at once in a 128-byte table, so a 256-entry table of f32 values, stored as
//! four planes of 256 bytes (byte 0 of every entry, byte 1, …), is looked up for 64 codes with
//! eight permutes and then transposed back into f32 lanes; no gathers, no scalar loads. On the
//! shared Zen 4: dequantising 64 codes took ~0.5 ns per value with 16-lane scalar loads and
//! ~0.1–0.2 ns with these permutes (same bits: a lookup is a copy). Quantisation looks up single
//! planes on bucket keys ([`Rounding`]) and compares the thresholds byte by byte, 64 values per
//! instruction: the same codes as `Map::quantize` for every f32 (an exhaustive test, ignored by
//! default, checks all 2^32).

use std::arch::x86_64::*;

/// A table of 256 four-byte values as byte planes: `planes[b][k]` = byte `b` (little-endian) of
/// entry `k`. Aligned so each quarter of a plane is one 64-byte load.
#[repr(C, align(64))]
pub(super) struct BytePlanes(pub(super) [[u8; 256]; 4]);

impl BytePlanes {
    pub(super) fn new(values: &[u32; 256]) -> Self {
        let mut planes = [[0u8; 256]; 4];
        for (k, v) in values.iter().enumerate() {
            for (b, byte) in v.to_le_bytes().into_iter().enumerate() {
                planes[b][k] = byte;
            }
        }
        BytePlanes(planes)
    }
}

/// `plane[index[j]]` for the 64 byte lanes; `high` is the top bit of every index (it picks the
/// upper 128 bytes, which `vpermi2b` cannot address).
#[inline(always)]
unsafe fn lookup_plane(plane: &[u8; 256], index: __m512i, high: __mmask64) -> __m512i {
    // (No closures here: they would not inherit the caller's target features and stay calls.)
    let t = plane.as_ptr();
    let low_half =
        _mm512_permutex2var_epi8(_mm512_loadu_si512(t.cast()), index, _mm512_loadu_si512(t.add(64).cast()));
    let high_half = _mm512_permutex2var_epi8(
        _mm512_loadu_si512(t.add(128).cast()),
        index,
        _mm512_loadu_si512(t.add(192).cast()),
    );
    _mm512_mask_blend_epi8(high, low_half, high_half)
}

/// Byte `k` of the input goes to byte `PLANE_ORDER[k]`'s place before the lookup, so that the
/// byte-plane → f32 transposition (unpacks within 128-bit lanes) yields the values in order:
/// unpacking puts byte `16i + 4a + c` (lane `i`) into register `a`, lane `i`, position `c`, and
/// register `a` must hold values `16a..16a + 16`, i.e. value `16a + 4i + c`.
const PLANE_ORDER: [u8; 64] = {
    let mut order = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let (i, a, c) = (k / 16, (k / 4) % 4, k % 4);
        order[k] = (16 * a + 4 * i + c) as u8;
        k += 1;
    }
    order
};

/// The table entries of 64 codes, as four vectors of 16 f32 lanes in order.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX512_VBMI must be present; `codes` must point at 64 readable bytes.
#[inline(always)]
pub(super) unsafe fn lookup64(table: &BytePlanes, codes: *const u8) -> [__m512; 4] {
    let order = _mm512_loadu_si512(PLANE_ORDER.as_ptr().cast());
    let index = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes.cast()));
    let v = lookup64_in_plane_order(table, index);
    [
        _mm512_castsi512_ps(v[0]),
        _mm512_castsi512_ps(v[1]),
        _mm512_castsi512_ps(v[2]),
        _mm512_castsi512_ps(v[3]),
    ]
}

/// The table entries of 64 indices given in [`PLANE_ORDER`], as four vectors of 16 lanes in order.
#[inline(always)]
unsafe fn lookup64_in_plane_order(table: &BytePlanes, index: __m512i) -> [__m512i; 4] {
    let high = _mm512_movepi8_mask(index);
    let p = [
        lookup_plane(&table.0[0], index, high),
        lookup_plane(&table.0[1], index, high),
        lookup_plane(&table.0[2], index, high),
        lookup_plane(&table.0[3], index, high),
    ];
    let (low01, high01) = (_mm512_unpacklo_epi8(p[0], p[1]), _mm512_unpackhi_epi8(p[0], p[1]));
    let (low23, high23) = (_mm512_unpacklo_epi8(p[2], p[3]), _mm512_unpackhi_epi8(p[2], p[3]));
    [
        _mm512_unpacklo_epi16(low01, low23),
        _mm512_unpackhi_epi16(low01, low23),
        _mm512_unpacklo_epi16(high01, high23),
        _mm512_unpackhi_epi16(high01, high23),
    ]
}

/// Byte `BYTE` of the 16 lanes of four vectors (values `16a + l` in vector `a`), as 64 bytes in
/// order: byte `j` is value `j`'s. Two permutes take vectors 0, 1 and 2, 3 (bit 6 of an index
/// picks the second source); a blend takes the upper 32 bytes from the second.
#[inline(always)]
unsafe fn pack_byte<const BYTE: usize>(v: &[__m512i; 4]) -> __m512i {
    const PICK: [[u8; 64]; 4] = {
        let mut pick = [[0u8; 64]; 4];
        let (mut byte, mut j) = (0, 0);
        while byte < 4 {
            while j < 64 {
                pick[byte][j] = (64 * ((j / 16) % 2) + 4 * (j % 16) + byte) as u8;
                j += 1;
            }
            (byte, j) = (byte + 1, 0);
        }
        pick
    };
    let pick = _mm512_loadu_si512(PICK[BYTE].as_ptr().cast());
    let from_01 = _mm512_permutex2var_epi8(v[0], pick, v[1]);
    let from_23 = _mm512_permutex2var_epi8(v[2], pick, v[3]);
    _mm512_mask_blend_epi8(0xFFFF_FFFF_0000_0000, from_01, from_23)
}

/// The 16-lane masks of four vectors as one mask of their 64 values in order.
#[inline(always)]
pub(super) fn join_masks(m: [__mmask16; 4]) -> __mmask64 {
    u64::from(m[0]) | u64::from(m[1]) << 16 | u64::from(m[2]) << 32 | u64::from(m[3]) << 48
}

/// Where the 23-bit mantissas given as byte vectors `y` (bytes 0, 1, 2, in order) exceed the
/// mantissas of the `table`'s planes 0..3 at the looked-up `keys`: a comparison of three-digit
/// numbers in base 256, most significant byte first.
#[inline(always)]
unsafe fn mantissa_above(table: &BytePlanes, keys: __m512i, high: __mmask64, y: &[__m512i; 3]) -> __mmask64 {
    let t2 = lookup_plane(&table.0[2], keys, high);
    let t1 = lookup_plane(&table.0[1], keys, high);
    let t0 = lookup_plane(&table.0[0], keys, high);
    let (above2, equal2) = (_mm512_cmpgt_epu8_mask(y[2], t2), _mm512_cmpeq_epi8_mask(y[2], t2));
    let (above1, equal1) = (_mm512_cmpgt_epu8_mask(y[1], t1), _mm512_cmpeq_epi8_mask(y[1], t1));
    let above0 = _mm512_cmpgt_epu8_mask(y[0], t0);
    above2 | (equal2 & (above1 | (equal1 & above0)))
}

/// Nearest rounding to a quantisation map without gathers: what `Map::quantize` computes (the
/// number of midpoints below `x`), for 64 values at once.
///
/// With `P` the map's positive midpoints: a value `x ≥ 0` has `N + #{p < x}` midpoints below it (`N`
/// = the map's negative entries = its negative midpoints), and as the negative midpoints are the
/// `N` smallest of `P` negated (checked when the tables are built), `x < 0` has
/// `N − min(#{p ≤ |x|}, N)`; `#{p ≤ y} = #{p < next float after y}`: integer comparisons of bits.
///
/// `#{p < y}` comes from buckets of floats: one octave (exponent) of `y` is split into `2^k`
/// buckets by its top `k` mantissa bits, `k` per exponent just large enough that a bucket holds at
/// most `MIDPOINTS` midpoints, over the exponents that hold midpoints (outside them `y` is clamped
/// to the range's ends, which changes no count). Bucket keys run over at most 256 values: a key is
/// a byte, and a bucket's data (the count of midpoints below it, and the mantissas of the at most
/// two midpoints inside it) is one or two [`BytePlanes`] looked up with byte permutes. A midpoint
/// in `y`'s bucket has `y`'s exponent, so comparing mantissas compares the floats.
pub(super) struct Rounding {
    /// Per exponent (at `exponent % 32`): the key of bucket is `(y >> shift) + offset` (wrapping).
    shift: [u32; 32],
    offset: [u32; 32],
    /// The clamp range of `y` (as f32 bits): the first and last float of the exponents kept.
    y_min: u32,
    y_max: u32,
    /// The map's negative entries.
    negatives: u32,
    /// Per bucket: count of midpoints below it `<< 24 | ` the mantissa of its first midpoint
    /// (`NONE` without one).
    first: BytePlanes,
    /// Per bucket: the mantissa of its second midpoint (`NONE` without one); absent where every
    /// bucket holds at most one.
    second: Option<BytePlanes>,
}

/// A mantissa threshold above every mantissa: the bucket holds no (further) midpoint.
const NONE: u32 = 1 << 23;
const MANTISSA: u32 = NONE - 1;

impl Rounding {
    /// The tables for the sorted map `code`; `None` if it does not fit them (more than 256
    /// buckets, midpoints over more than 32 exponents, or asymmetric negative midpoints).
    pub(super) fn new(code: &[f32; 256]) -> Option<Self> {
        let midpoints: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let positive: Vec<u32> = midpoints.iter().filter(|&&m| m > 0.0).map(|m| m.to_bits()).collect();
        let mut negative: Vec<u32> = midpoints.iter().filter(|&&m| m < 0.0).map(|m| (-m).to_bits()).collect();
        negative.sort_unstable();
        let negatives = code.iter().filter(|c| c.is_sign_negative()).count();
        let symmetric = negative.len() == negatives && positive.get(..negatives) == Some(&negative[..]);
        let (&lowest, &highest) = (positive.first()?, positive.last()?);
        let (e_min, e_max) = (lowest >> 23, highest >> 23);
        // The last float of the top exponent: above every midpoint, so clamping to it counts them all.
        let y_max = ((e_max + 1) << 23) - 1;
        let fits = symmetric && midpoints.len() == positive.len() + negatives && highest < y_max;
        if !fits || e_max - e_min >= 32 || e_max >= 0xFE {
            return None;
        }
        // Bucket `j` of 2^k in exponent `e`: the floats with bits `e << 23 | j << (23 - k) | …`.
        let inside = |e: u32, k: u32, j: u32| {
            let start = e << 23 | j << (23 - k);
            positive.iter().copied().filter(move |&p| p >= start && p < start + (1 << (23 - k)))
        };
        let (midpoints_per_bucket, bits) = (1..=2).find_map(|most| {
            let bits: Vec<u32> = (e_min..=e_max)
                .map(|e| {
                    (0..=23).find(|&k| (0..1 << k).all(|j| inside(e, k, j).count() <= most)).unwrap_or(23)
                })
                .collect();
            (bits.iter().map(|k| 1u32 << k).sum::<u32>() <= 256).then_some((most, bits))
        })?;
        let (mut shift, mut offset) = ([0u32; 32], [0u32; 32]);
        let (mut first, mut second) = ([NONE; 256], [NONE; 256]);
        let mut key = 0u32;
        for (e, &k) in (e_min..=e_max).zip(&bits) {
            shift[(e % 32) as usize] = 23 - k;
            offset[(e % 32) as usize] = key.wrapping_sub(e << k);
            for j in 0..1 << k {
                let start = e << 23 | j << (23 - k);
                let below = positive.iter().filter(|&&p| p < start).count() as u32;
                let mut mantissas = inside(e, k, j).map(|p| p & MANTISSA);
                first[key as usize] = below << 24 | mantissas.next().unwrap_or(NONE);
                second[key as usize] = mantissas.next().unwrap_or(NONE);
                key += 1;
            }
        }
        Some(Rounding {
            shift,
            offset,
            y_min: e_min << 23,
            y_max,
            negatives: negatives as u32,
            first: BytePlanes::new(&first),
            second: (midpoints_per_bucket > 1).then(|| BytePlanes::new(&second)),
        })
    }
}

/// The nearest entries of `rounding`'s map for 64 values (four vectors of 16 in order), as 64
/// entry indices in bytes, in order; ±∞ and NaN give entry 0 (as `Map::quantize`). The bucket
/// lookups and the comparisons with the midpoints' mantissas run on the 64 values' bytes (no
/// transposition of the tables' bytes back into 32-bit lanes).
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX512_VBMI must be present.
#[inline(always)]
pub(super) unsafe fn quantize64(rounding: &Rounding, x: [__m512; 4]) -> __m512i {
    let r = rounding;
    let set = _mm512_set1_epi32;
    let (shift_low, shift_high) =
        (_mm512_loadu_si512(r.shift.as_ptr().cast()), _mm512_loadu_si512(r.shift.as_ptr().add(16).cast()));
    let (offset_low, offset_high) =
        (_mm512_loadu_si512(r.offset.as_ptr().cast()), _mm512_loadu_si512(r.offset.as_ptr().add(16).cast()));
    let mut y = [_mm512_setzero_si512(); 4];
    let mut keys = [_mm512_setzero_si512(); 4];
    let mut negative = [0 as __mmask16; 4];
    let mut finite = [0 as __mmask16; 4];
    for a in 0..4 {
        let bits = _mm512_castps_si512(x[a]);
        let magnitude = _mm512_and_si512(bits, set(i32::MAX));
        finite[a] = _mm512_cmplt_epu32_mask(magnitude, set(0x7F80_0000));
        negative[a] = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
        // #{p ≤ |x|} for negative x: the next float up.
        let next = _mm512_mask_add_epi32(magnitude, negative[a], magnitude, set(1));
        y[a] = _mm512_min_epu32(_mm512_max_epu32(next, set(r.y_min as i32)), set(r.y_max as i32));
        let exponent = _mm512_srli_epi32::<23>(y[a]);
        let shift = _mm512_permutex2var_epi32(shift_low, exponent, shift_high);
        let offset = _mm512_permutex2var_epi32(offset_low, exponent, offset_high);
        keys[a] = _mm512_add_epi32(_mm512_srlv_epi32(y[a], shift), offset);
    }
    let keys = pack_byte::<0>(&keys);
    let high = _mm512_movepi8_mask(keys);
    // The mantissa's bytes (bit 7 of byte 2 is the exponent's lowest bit: cleared).
    let mantissa = [
        pack_byte::<0>(&y),
        pack_byte::<1>(&y),
        _mm512_and_si512(pack_byte::<2>(&y), _mm512_set1_epi8(0x7F)),
    ];
    let below = lookup_plane(&r.first.0[3], keys, high);
    let one = _mm512_set1_epi8(1);
    let count = _mm512_mask_add_epi8(below, mantissa_above(&r.first, keys, high, &mantissa), below, one);
    let count = match &r.second {
        Some(table) => _mm512_mask_add_epi8(count, mantissa_above(table, keys, high, &mantissa), count, one),
        None => count,
    };
    // Counts stay below 256: at most the map's 255 midpoints.
    let negatives = _mm512_set1_epi8(r.negatives as u8 as i8);
    let if_negative = _mm512_sub_epi8(negatives, _mm512_min_epu8(count, negatives));
    let code = _mm512_mask_blend_epi8(join_masks(negative), _mm512_add_epi8(negatives, count), if_negative);
    _mm512_maskz_mov_epi8(join_masks(finite), code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn lookup64_to_vec(table: &BytePlanes, codes: &[u8; 64]) -> Vec<u32> {
        let mut out = [0u32; 64];
        for (a, v) in lookup64(table, codes.as_ptr()).into_iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * a).cast(), v);
        }
        out.to_vec()
    }

    /// Every entry at every one of the 64 positions (codes `k + j` mod 256 for every shift `k`),
    /// on a table whose four bytes differ in every entry.
    #[test]
    fn lookup64_reads_every_entry_at_every_position() {
        if !super::super::vbmi_detected() {
            return;
        }
        let values: [u32; 256] =
            std::array::from_fn(|k| (k as u32).wrapping_mul(0x9E37_79B9) ^ (0x0102_0304 * (k as u32 % 7)));
        let table = BytePlanes::new(&values);
        for shift in 0..256 {
            let codes: [u8; 64] = std::array::from_fn(|j| ((shift + 5 * j) % 256) as u8);
            let want: Vec<u32> = codes.iter().map(|&c| values[c as usize]).collect();
            // SAFETY: the features were detected above.
            assert_eq!(unsafe { lookup64_to_vec(&table, &codes) }, want, "shift {shift}");
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn quantize64_to_vec(rounding: &Rounding, x: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(x.len());
        for chunk in x.chunks_exact(64) {
            let p = chunk.as_ptr();
            let v = [
                _mm512_loadu_ps(p),
                _mm512_loadu_ps(p.add(16)),
                _mm512_loadu_ps(p.add(32)),
                _mm512_loadu_ps(p.add(48)),
            ];
            let mut codes = [0u8; 64];
            _mm512_storeu_si512(codes.as_mut_ptr().cast(), quantize64(rounding, v));
            out.extend(codes);
        }
        out
    }

    /// `quantize64` against the scalar `Map::quantize` on `xs` (padded to whole 64s), both maps.
    fn check(xs: &mut Vec<f32>) {
        xs.resize(xs.len().div_ceil(64) * 64, 0.0);
        let (m1, m2) = super::super::maps();
        for m in [m1, m2] {
            let rounding = m.vbmi_rounding.as_ref().expect("both maps fit the VBMI tables");
            // SAFETY: callers checked the features.
            let got = unsafe { quantize64_to_vec(rounding, xs) };
            for (x, got) in xs.iter().zip(got) {
                assert_eq!(got, m.quantize(*x), "x = {x:e} ({:#010x})", x.to_bits());
            }
        }
    }

    /// Dense sweep: every 16-bit bucket of the floats (both signs, all exponents, NaN and ±∞) at
    /// both ends and the middle of its low bits, and every entry and every midpoint of both maps
    /// (both signs) with its neighbours up to 3 ulp away.
    #[test]
    fn quantize64_equals_the_scalar_rounding() {
        if !super::super::vbmi_detected() {
            return;
        }
        let mut xs: Vec<f32> = (0u32..1 << 16)
            .flat_map(|key| [0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF].map(|low| f32::from_bits(key << 16 | low)))
            .collect();
        let (m1, m2) = super::super::maps();
        for m in [m1, m2] {
            let midpoints = m.code.windows(2).map(|w| (w[0] + w[1]) * 0.5);
            for v in m.code.iter().copied().chain(midpoints) {
                for d in -3i32..=3 {
                    for sign in [0, 1 << 31] {
                        xs.push(f32::from_bits(v.abs().to_bits().wrapping_add_signed(d) | sign));
                    }
                }
            }
        }
        check(&mut xs);
    }

    /// Every f32 bit pattern (~1 min on one core).
    #[test]
    #[ignore = "exhaustive: run with --ignored"]
    fn quantize64_equals_the_scalar_rounding_on_every_f32() {
        if !super::super::vbmi_detected() {
            return;
        }
        for high in 0u32..1 << 8 {
            let mut xs: Vec<f32> = (0u32..1 << 24).map(|low| f32::from_bits(high << 24 | low)).collect();
            check(&mut xs);
        }
    }
}
