//! Refcount block entries of every width (1 to 64 bits).
//!
//! Sub-byte widths are packed least significant bits first; wider ones are big-endian.

use crate::error::{Error, Result};

/// Width of refcount entries and the block arithmetic that follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountWidth {
    /// log2 of the width in bits (0..=6).
    pub order: u32,
}

impl RefcountWidth {
    pub fn new(order: u32) -> Self {
        debug_assert!(order <= 6);
        RefcountWidth { order }
    }

    pub fn bits(self) -> u32 {
        1 << self.order
    }

    /// Largest refcount this width can hold.
    pub fn max(self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Entries in one refcount block of `cluster_size` bytes.
    pub fn entries_per_block(self, cluster_bits: u32) -> u64 {
        (1u64 << (cluster_bits + 3)) >> self.order
    }

    /// Reads entry `index` of a refcount block.
    #[inline(always)]
    pub fn get(self, block: &[u8], index: usize) -> u64 {
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let bit = index * bits;
                let byte = block[bit / 8];
                u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
            }
            3 => u64::from(block[index]),
            4 => u64::from(u16::from_be_bytes([block[index * 2], block[index * 2 + 1]])),
            5 => {
                let o = index * 4;
                u64::from(u32::from_be_bytes([
                    block[o],
                    block[o + 1],
                    block[o + 2],
                    block[o + 3],
                ]))
            }
            _ => {
                let o = index * 8;
                let mut a = [0u8; 8];
                a.copy_from_slice(&block[o..o + 8]);
                u64::from_be_bytes(a)
            }
        }
    }

    /// Writes entry `index` of a refcount block. Errors if `value` does not fit the width.
    pub fn set(self, block: &mut [u8], index: usize, value: u64) -> Result<()> {
        if value > self.max() {
            return Err(Error::NoSpace(format!(
                "refcount {value} exceeds the maximum of {} for {}-bit refcounts",
                self.max(),
                self.bits()
            )));
        }
        match self.order {
            0..=2 => {
                let bits = self.bits() as usize;
                let bit = index * bits;
                let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
                let b = &mut block[bit / 8];
                *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
            }
            3 => block[index] = value as u8,
            4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
            5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
            _ => block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn widths() {
        assert_eq!(RefcountWidth::new(4).entries_per_block(16), 32768);
        assert_eq!(RefcountWidth::new(0).entries_per_block(9), 4096);
        assert_eq!(RefcountWidth::new(6).entries_per_block(9), 64);
        assert_eq!(RefcountWidth::new(0).max(), 1);
        assert_eq!(RefcountWidth::new(6).max(), u64::MAX);
    }

    #[test]
    fn sub_byte_packing_is_lsb_first() {
        let w = RefcountWidth::new(1); // 2 bits
        let mut b = [0u8; 2];
        w.set(&mut b, 0, 1).unwrap();
        w.set(&mut b, 3, 3).unwrap();
        assert_eq!(b[0], 0b1100_0001);
        assert!(w.set(&mut b, 1, 4).is_err());
        let w16 = RefcountWidth::new(4);
        let mut b = [0u8; 4];
        w16.set(&mut b, 1, 0x1234).unwrap();
        assert_eq!(b, [0, 0, 0x12, 0x34]);
    }

    proptest! {
        #[test]
        fn set_get_independent(order in 0u32..=6, ops in prop::collection::vec((0usize..64, any::<u64>()), 1..50)) {
            let w = RefcountWidth::new(order);
            let mut block = vec![0u8; 512];
            let mut model = vec![0u64; 64];
            for (i, v) in ops {
                let v = v & w.max();
                w.set(&mut block, i, v).unwrap();
                model[i] = v;
            }
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(w.get(&block, i), m);
            }
        }
    }
}
