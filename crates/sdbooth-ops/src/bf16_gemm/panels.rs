//! Operands packed once into the microkernel's panels for many products that each read a part
//! of them: attention packs each head's q, k, v (and output gradient) once, where packing them
//! per tile product repacked every key tile once per block of queries.
//!
//! The parts are the same panels a product would pack from the same part of the matrix (same
//! bf16 pairs: a part starts at an even k and at a panel boundary, and only the operand's last
//! part may end on an odd k, padded as the product would pad it), so a product reading them
//! sums the same terms in the same order: bit-identical results.

use super::{Bf16Kernel, MR, NR};
use crate::cpu::Mat;
use std::ops::Range;

/// An f32 matrix `outer × k` (a product's lhs rows or rhs columns by its k) packed as bf16
/// panels of `width` outer indices, `[panel][k pair][width]`. The outer indices are cut into
/// blocks of `block`, each starting a new panel (the lhs of attention: blocks of query rows
/// that are not a multiple of the panel height).
#[derive(Default)]
pub(crate) struct Panels {
    data: Vec<u32>,
    width: usize,
    outer: usize,
    k: usize,
    block: usize,
}

/// Part of [`Panels`]: the operand of one product ([`super::Operand::Packed`]).
#[derive(Clone, Copy)]
pub(crate) struct PanelsPart<'a> {
    /// The values from the part's first pair of its first panel on.
    pub(super) data: &'a [u32],
    /// Values from one panel to the next.
    pub(super) stride: usize,
    pub(super) width: usize,
    /// Outer indices and k values of the part.
    pub(super) outer: usize,
    pub(super) k: usize,
}

impl PanelsPart<'_> {
    /// Whether the part holds a `outer × k` operand as panels of `width`.
    pub(super) fn fits(&self, width: usize, outer: usize, k: usize) -> bool {
        let panels = outer.div_ceil(width);
        self.width == width
            && self.outer >= outer
            && self.k == k
            && (panels == 0 || (panels - 1) * self.stride + k.div_ceil(2) * width <= self.data.len())
    }
}

impl Panels {
    /// Whether the active kernel reads packed panels (the AVX512_BF16 one; the f32 fallback
    /// widens operands instead): where it does not, products take their operands as matrices.
    pub(crate) fn supported() -> bool {
        super::active_kernel() == Bf16Kernel::Avx512Bf16
    }

    /// Packs `a[m×k]` as a product's lhs, rows in blocks of `block` (each block's first row
    /// starts a panel), on this thread; the buffer is reused and only grows.
    pub(crate) fn pack_lhs(&mut self, m: usize, k: usize, a: Mat<'_>, block: usize) {
        assert!(block > 0, "bf16 gemm: lhs blocks of zero rows");
        self.fill(MR, m, k, block, |rows, out| {
            let block_rows = Mat { data: &a.data[rows.start * a.rs..], ..a };
            #[cfg(target_arch = "x86_64")]
            super::pack::lhs_into(rows.len(), k, block_rows, out);
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (block_rows, out);
        });
    }

    /// Packs `b[k×n]` as a product's rhs, on this thread (the buffer is reused and only grows).
    pub(crate) fn pack_rhs(&mut self, k: usize, n: usize, b: Mat<'_>) {
        self.fill(NR, n, k, n.next_multiple_of(NR).max(NR), |cols, out| {
            let block_cols = Mat { data: &b.data[cols.start * b.cs..], ..b };
            #[cfg(target_arch = "x86_64")]
            super::pack::rhs_into(k, cols.len(), block_cols, out);
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (block_cols, out);
        });
    }

    /// Lays out `outer × k` in blocks and packs each block with `pack(its outer indices, its
    /// panels)`.
    fn fill(
        &mut self,
        width: usize,
        outer: usize,
        k: usize,
        block: usize,
        mut pack: impl FnMut(Range<usize>, &mut [u32]),
    ) {
        assert!(Self::supported(), "bf16 gemm: panels packed for a kernel that does not read them");
        *self = Panels { data: std::mem::take(&mut self.data), width, outer, k, block };
        let len = outer.div_ceil(block) * block.div_ceil(width) * self.stride();
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        if k == 0 {
            return;
        }
        let stride = self.stride();
        for o0 in (0..outer).step_by(block) {
            let o1 = (o0 + block).min(outer);
            let at = self.panel(o0) * stride;
            pack(o0..o1, &mut self.data[at..at + (o1 - o0).div_ceil(width) * stride]);
        }
    }

    /// Values per panel (every k pair of `width` outer indices).
    fn stride(&self) -> usize {
        self.k.div_ceil(2) * self.width
    }

    /// The panel that starts at outer index `o` (at a block start or a panel boundary in it).
    fn panel(&self, o: usize) -> usize {
        (o / self.block) * self.block.div_ceil(self.width) + (o % self.block) / self.width
    }

    /// The part at outer indices `outer` (inside one block, from a panel boundary) and k values
    /// `ks` (from an even k; an odd length only at the end). Panics otherwise (a crate bug).
    pub(crate) fn part(&self, outer: Range<usize>, ks: Range<usize>) -> PanelsPart<'_> {
        assert!(
            outer.start < outer.end
                && outer.end <= self.outer
                && (outer.start % self.block).is_multiple_of(self.width)
                && outer.start / self.block == (outer.end - 1) / self.block,
            "bf16 gemm: part {outer:?} of {} packed outer indices in blocks of {}",
            self.outer,
            self.block
        );
        assert!(
            ks.start.is_multiple_of(2)
                && ks.start <= ks.end
                && ks.end <= self.k
                && (ks.end == self.k || ks.len().is_multiple_of(2)),
            "bf16 gemm: part at k {ks:?} of {} packed",
            self.k
        );
        PanelsPart {
            data: &self.data[self.panel(outer.start) * self.stride() + (ks.start / 2) * self.width..],
            stride: self.stride(),
            width: self.width,
            outer: outer.len(),
            k: ks.len(),
        }
    }
}
